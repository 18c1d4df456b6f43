// Open a page in headless Chromium (Debian's /usr/bin/chromium, driven by playwright-core), wait for its #out
// to be done, print its text.   node browser.mjs URL
import { chromium } from "playwright-core";

const [url] = process.argv.slice(2);
const browser = await chromium.launch({
  executablePath: process.env.CHROMIUM || "/usr/bin/chromium",
  args: ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run", "--disable-background-networking",
         "--disable-component-update", "--disable-sync"],
});
try {
  const page = await browser.newPage();
  const errors = [];
  page.on("pageerror", (e) => errors.push(String(e)));
  await page.goto(url);
  await page.waitForSelector("#out[data-done='1']", { timeout: 240000 });
  const text = await page.textContent("#out");
  console.log(text.startsWith("ERROR") && errors.length ? `${text} | ${errors.join(" | ")}` : text);
} finally {
  await browser.close();
}
