// Open a page in headless Chromium (Debian's /usr/bin/chromium, driven by playwright-core), wait for its #out
// to be done, print its text.   node browser.mjs URL
// A URL with device=webgpu starts Chromium with WebGPU on (its GPU process; with no GPU on the machine, headless
// Chromium's adapter is SwiftShader, Vulkan on the CPU); any other runs with the GPU off.
import { chromium } from "playwright-core";

const [url] = process.argv.slice(2);
const webgpu = new URL(url).searchParams.get("device") === "webgpu";
const browser = await chromium.launch({
  executablePath: process.env.CHROMIUM || "/usr/bin/chromium",
  args: ["--no-sandbox", ...(webgpu ? ["--enable-unsafe-webgpu"] : ["--disable-gpu"]), "--disable-quic", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync"],
});
try {
  const page = await browser.newPage();
  const errors = [];
  page.on("pageerror", (e) => errors.push(String(e)));
  await page.goto(url);
  await page.waitForSelector("#out[data-done='1']", { timeout: 240000 });
  const text = await page.textContent("#out");
  const line = text.startsWith("ERROR") && errors.length ? `${text} | ${errors.join(" | ")}` : text;
  console.log(line.replace(/\s*\n\s*/g, " | "));  // one line: the caller reads the last
} finally {
  await browser.close();
}
