// Greedy generation from an edgegpt bundle with transformers.js (onnxruntime-node), offline.
// The bundle is used as written: model.onnx at its top level (subfolder ""), tokenizer files beside it.
//   node generate.mjs BUNDLE PROMPT NEW_TOKENS  ->  {"prompt_ids": [...], "ids": [...]}
import { AutoModelForCausalLM, AutoTokenizer, env } from "@huggingface/transformers";

const [bundle, prompt, n] = process.argv.slice(2);
env.allowRemoteModels = false;
env.localModelPath = "";
const tokenizer = await AutoTokenizer.from_pretrained(bundle, { local_files_only: true });
const model = await AutoModelForCausalLM.from_pretrained(bundle, {
  local_files_only: true, subfolder: "", model_file_name: "model", dtype: "fp32",
});
const inputs = tokenizer(prompt);
const out = await model.generate({ ...inputs, max_new_tokens: Number(n), min_new_tokens: Number(n), do_sample: false });
const ids = Array.from(out.data, Number).slice(inputs.input_ids.dims[1]);
console.log(JSON.stringify({ prompt_ids: Array.from(inputs.input_ids.data, Number), ids }));
