// Greedy generation with transformers.js (onnxruntime-node), offline.
//   node generate.mjs BUNDLE PROMPT NEW_TOKENS          an edgegpt bundle as written: model.onnx at its top level
//   node generate.mjs PACKAGE PROMPT NEW_TOKENS DTYPE   a web package (`edgegpt package --target web`), loaded as a
//                                                       Hub model: transformers.js's defaults, the file its dtype names
//   -> {"prompt_ids": [...], "ids": [...]}
import { AutoModelForCausalLM, AutoTokenizer, env } from "@huggingface/transformers";

const [dir, prompt, n, dtype] = process.argv.slice(2);
env.allowRemoteModels = false;
env.localModelPath = "";
const tokenizer = await AutoTokenizer.from_pretrained(dir, { local_files_only: true });
const options = dtype ? { local_files_only: true, dtype }
  : { local_files_only: true, subfolder: "", model_file_name: "model", dtype: "fp32" };
const model = await AutoModelForCausalLM.from_pretrained(dir, options);
const inputs = tokenizer(prompt);
const out = await model.generate({ ...inputs, max_new_tokens: Number(n), min_new_tokens: Number(n), do_sample: false });
const ids = Array.from(out.data, Number).slice(inputs.input_ids.dims[1]);
console.log(JSON.stringify({ prompt_ids: Array.from(inputs.input_ids.data, Number), ids }));
