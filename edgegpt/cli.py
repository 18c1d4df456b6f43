"""The `edgegpt` command: click declarations over the library functions.

Heavy imports (torch, onnx) happen inside each command so `edgegpt --help` stays fast. Every
EdgeGPTError (and an operating-system error: a full disk, a read-only folder) becomes one line on
stderr and exit 1; anything else is a bug and keeps its traceback.
"""

from __future__ import annotations

import logging
import sys

import click

from edgegpt import __version__
from edgegpt.clikit import (friendly_errors, generator_for, int_list, recipe_options, sampling_options,
                            speculate_option)
from edgegpt.errors import EdgeGPTError
from edgegpt.package.targets import TARGETS
from edgegpt.quantize.plan import KV_CHOICES
from edgegpt.quantize.recipes import CARDS


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="edgegpt")
@click.option("-v", "--verbose", is_flag=True, help="Log progress details.")
@click.option("--no-hugepages", is_flag=True,
              help="Do not restart generate / chat / eval with glibc's huge pages (also: EDGEGPT_HUGEPAGES=0).")
def main(verbose: bool, no_hugepages: bool) -> None:
    """edgegpt: train or load a GPT-2 family model, export it to ONNX with a KV cache,
    quantize it and run it offline with onnxruntime."""
    logging.basicConfig(level=logging.INFO if verbose else logging.WARNING, format="%(levelname)s %(name)s: %(message)s")


@main.command()
@click.option("--data", "data", multiple=True, required=True, metavar="PATH",
              help="Plain-text file(s), or builtin:pydoc (CPython's bundled documentation). Repeatable.")
@click.option("--out", required=True, type=click.Path(file_okay=False), help="Checkpoint dir to write (HF GPT-2 layout).")
@click.option("--preset", type=click.Choice(["tiny", "small", "gpt2"]), default=None,
              help="Model size [tiny; with --teacher: half the teacher's layers at its width].")
@click.option("--n-layer", type=click.IntRange(min=1))
@click.option("--n-head", type=click.IntRange(min=1))
@click.option("--n-embd", type=click.IntRange(min=1))
@click.option("--n-positions", type=click.IntRange(min=2))
@click.option("--vocab-size", type=click.IntRange(min=258))
@click.option("--block-size", type=click.IntRange(min=2), help="Training sequence length [min(n_positions, 128)].")
@click.option("--batch-size", type=click.IntRange(min=1), default=16, show_default=True)
@click.option("--max-steps", type=click.IntRange(min=1), default=300, show_default=True)
@click.option("--lr", type=float, default=3e-3, show_default=True)
@click.option("--min-lr", type=float, default=3e-4, show_default=True)
@click.option("--warmup-steps", type=click.IntRange(min=0), default=None,
              help="Linear warmup steps [10% of --max-steps, at most 30].")
@click.option("--weight-decay", type=float, default=0.1, show_default=True)
@click.option("--grad-clip", type=float, default=1.0, show_default=True, help="0 = off.")
@click.option("--eval-interval", type=click.IntRange(min=0), default=100, show_default=True)
@click.option("--checkpoint-interval", type=click.IntRange(min=0), default=0, show_default=True,
              help="Save every N steps (0 = at the end only).")
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--init", type=click.Path(exists=True, file_okay=False), help="Fine-tune this HF GPT-2 checkpoint.")
@click.option("--resume", is_flag=True, help="Continue the run saved in --out.")
@click.option("--overwrite", is_flag=True, help="Replace a checkpoint already in --out.")
@click.option("--teacher", type=click.Path(exists=True, file_okay=False),
              help="Distil from this checkpoint: the student keeps its tokenizer and vocabulary (docs/distillation.md).")
@click.option("--alpha", type=click.FloatRange(0, 1), default=0.5, show_default=True,
              help="--teacher: weight of the teacher's soft targets (1 - alpha: the text's cross-entropy).")
@click.option("--temperature", type=click.FloatRange(min=0, min_open=True), default=2.0, show_default=True,
              help="--teacher: softmax temperature of the soft targets.")
@click.option("--hidden-loss", type=click.FloatRange(min=0), default=0.0, show_default=True,
              help="--teacher: weight of a cosine loss between mapped student and teacher block outputs.")
@click.option("--init-from-teacher", is_flag=True,
              help="--teacher: start from the teacher's embeddings and evenly spaced blocks (DistilGPT-2's start).")
@friendly_errors
def train(data, out, resume, overwrite, init, **kw):
    """Train a GPT (and its byte-level BPE tokenizer) on text."""
    from edgegpt.model.train import TrainConfig, train as run_train

    res = run_train(TrainConfig(data=list(data), out=out, resume=resume, overwrite=overwrite, init=init, **kw))
    click.echo(f"trained {res.n_params / 1e6:.2f}M params for {res.steps} steps in {res.seconds:.1f}s "
               f"({res.tokens_per_s:,.0f} tok/s): train loss {res.train_loss:.3f}, val loss {res.val_loss:.3f}")
    click.echo(f"saved {res.out}")


@main.command()
@click.argument("model", type=click.Path(exists=True, file_okay=False))
@click.option("--prompt", required=True)
@sampling_options
@click.option("--stop", multiple=True, help="Stop string (repeatable); the output is cut before it.")
@click.option("--stream", is_flag=True, help="Print text as it is produced.")
@click.option("--provider", default="cpu", show_default=True,
              help="Execution provider for bundles: cpu, cuda, coreml, nnapi, xnnpack, qnn, dml.")
@click.option("--fallback", is_flag=True, help="Use cpu (with a warning) when --provider is not available.")
@click.option("--threads", type=click.IntRange(min=1), default=None, help="Intra-op threads (at most the CPU count).")
@click.option("--truncate-prompt", is_flag=True, help="Keep the prompt's last tokens when it is too long.")
@click.option("--verify", is_flag=True, help="Check every file of the bundle against its manifest's sha256 first.")
@speculate_option
@friendly_errors
def generate(model, prompt, max_new_tokens, temperature, top_k, top_p, repetition_penalty, seed, stop, stream,
             provider, fallback, threads, truncate_prompt, verify, speculate):
    """Generate text from a bundle (onnxruntime) or a checkpoint dir (PyTorch)."""
    gen = generator_for(model, provider, threads, fallback, verify, speculate)
    kw = dict(temperature=temperature, top_k=top_k, top_p=top_p, repetition_penalty=repetition_penalty, seed=seed,
              truncate_prompt=truncate_prompt, stop=stop)
    if not stream:
        click.echo(prompt + gen.generate(prompt, max_new_tokens, **kw))
        return
    pieces = gen.stream(prompt, max_new_tokens, **kw)
    first = next(pieces, "")  # the prompt is checked (and prefilled) before anything is printed
    click.echo(prompt + first, nl=False)
    for piece in pieces:
        click.echo(piece, nl=False)
    click.echo()


@main.command()
@click.argument("model", type=click.Path(exists=True, file_okay=False))
@click.option("--out", required=True, type=click.Path(file_okay=False), help="Bundle dir to write.")
@click.option("--graph", type=click.Choice(["fused", "traced"]), default="fused", show_default=True,
              help="fused: built with onnxruntime contrib ops (fastest on CPU/CUDA); traced: torch.onnx standard ops "
                   "(NNAPI, CoreML, QNN, XNNPACK, other runtimes).")
@click.option("--kv-cache", type=click.Choice(["auto", "shared", "concat"]), default="auto", show_default=True,
              help="shared: one fixed-capacity buffer updated in place (fused graph; edgegpt.runtime and "
                   "onnxruntime-genai): faster decode, an int8 KV cache, the kept chat cache, speculation; concat: "
                   "present = past + new (Optimum and transformers.js need it); auto: shared where the graph takes "
                   "it (fused, head_dim a multiple of 8), else concat.")
@click.option("--opset", type=int, default=17, show_default=True, help="ONNX opset (17 is the first with LayerNormalization).")
@click.option("--last-logits-only", is_flag=True,
              help="Logits for the last position only (faster prefill; no perplexity or Optimum use). Recorded in the manifest.")
@click.option("--external-data", type=click.Choice(["always", "auto", "never"]), default="always", show_default=True,
              help="always: the weights in model.onnx.data beside the graph, which onnxruntime maps from disk (less "
                   "memory, faster load than one file); auto: only above 1.5 GB; never: one file (under 2 GB).")
@click.option("--decode-steps", type=click.IntRange(min=1), default=32, show_default=True, help="Cached steps verified.")
@click.option("--atol", type=float, default=None, help="Max |logit diff| allowed [1e-4 for fp32].")
@click.option("--overwrite", is_flag=True, help="Replace an existing bundle dir.")
@click.option("--keep-failed", is_flag=True, help="Keep a bundle that fails verification (still exits non-zero).")
@friendly_errors
def export(model, out, graph, kv_cache, opset, last_logits_only, external_data, decode_steps, atol, overwrite,
           keep_failed):
    """Export a checkpoint to a verified ONNX bundle with KV-cache inputs."""
    from edgegpt.export.bundle import export_bundle
    from edgegpt.export.inspect import describe
    from edgegpt.export.onnx_export import ExportOptions

    options = ExportOptions(opset=opset, last_logits_only=last_logits_only, external_data=external_data, graph=graph,
                            kv_cache=kv_cache)
    export_bundle(model, out, options, overwrite=overwrite, keep_failed=keep_failed, decode_steps=decode_steps, atol=atol)
    click.echo(describe(out))


@main.command()
@click.argument("bundle", type=click.Path(exists=True, file_okay=False))
@click.option("--against", required=True, type=click.Path(exists=True, file_okay=False), help="Checkpoint dir.")
@click.option("--decode-steps", type=click.IntRange(min=1), default=32, show_default=True)
@click.option("--atol", type=float, default=None, help="Max |logit diff| allowed [1e-4 for fp32].")
@friendly_errors
def verify(bundle, against, decode_steps, atol):
    """Re-run a bundle's parity check against a PyTorch checkpoint."""
    from edgegpt.export.bundle import failure_message, reverify

    v = reverify(bundle, against, decode_steps=decode_steps, atol=atol)
    click.echo(f"max |logit diff| {v['max_abs_logit_diff']:.2e} (tolerance {v['tolerance']}), greedy agreement "
               f"{v['greedy_agreement']:.1%} over {v['prompt_tokens']}-token prompt + {v['decode_steps']} decode steps")
    if not v["passed"]:
        raise click.ClickException(failure_message(v))
    click.echo("PASSED")


@main.command()
@click.argument("bundle", type=click.Path(exists=True, file_okay=False))
@click.option("--target", required=True, type=click.Choice(list(TARGETS)))
@click.option("--out", required=True, type=click.Path(file_okay=False))
@click.option("--precision", type=click.Choice(list(CARDS)), default=None,
              help="Default per target: " + ", ".join(f"{t.name} {t.default_precision}" for t in TARGETS.values()) + ".")
@click.option("--calibration", type=click.Path(exists=True, dir_okay=False),
              help="int8-static calibration text [builtin:pydoc without its held-out tail].")
@click.option("--fixed-past", type=click.IntRange(min=1), default=None,
              help="Cache slots of the static graphs (mobile) [context - 1].")
@click.option("--prefill-buckets", default=None, metavar="N[,N...]",
              help="Prompt lengths of the static prefill graphs (mobile) [128].")
@click.option("--force", is_flag=True, help="Keep a precision pass that is over its quality budget.")
@click.option("--overwrite", is_flag=True)
@friendly_errors
def package(bundle, target, out, precision, calibration, fixed_past, prefill_buckets, force, overwrite):
    """Package a bundle for a target: precision, ORT format, operator config, provider report."""
    from edgegpt.corpus import read_nonempty
    from edgegpt.package.bundle import package_bundle, summary

    t = TARGETS[target]
    click.echo(f"target {target}: precision {precision or t.default_precision}"
               f"{'' if precision else ' (default: ' + t.why + ')'}; providers {', '.join(t.providers)}")
    m = package_bundle(bundle, target, out, precision=precision, calibration=read_nonempty(calibration, "calibration")
                       if calibration else None, fixed_past=fixed_past, overwrite=overwrite, force=force,
                       prefill_buckets=int_list(prefill_buckets, "--prefill-buckets", "32,128,512")
                       if prefill_buckets is not None else None)
    click.echo(summary(out, m))


@main.command()
@click.argument("bundle", type=click.Path(exists=True, file_okay=False))
@friendly_errors
def inspect(bundle):
    """Describe a bundle: dims, precision, IO, size, verification."""
    from edgegpt.export.inspect import describe

    click.echo(describe(bundle))


@main.command()
@click.argument("bundle", type=click.Path(exists=True, file_okay=False))
@click.option("--out", required=True, type=click.Path(file_okay=False), help="New bundle dir (the input is never touched).")
@click.option("--mode", "--precision", "mode", required=True, type=click.Choice(list(CARDS)),
              help="The precision recipe: " + "; ".join(f"{c.name}: {c.summary}" for c in CARDS.values()) + ".")
@recipe_options
@click.option("--kv-cache", "--kv-dtype", "kv_cache", type=click.Choice(list(KV_CHOICES)), default="auto",
              show_default=True,
              help="KV cache dtype of a --kv-cache shared export: int8 (static scales calibrated on --calibration "
                   "text; faster decode at long context, same time to first token) or fp32. auto: int8 for "
                   + "/".join(n for n, c in CARDS.items() if c.int8_kv_cache == "auto") + " weights unless, along the "
                   "decode path, it adds over 25% (+1e-4) to the weights' own KL.")
@click.option("--calibration", type=click.Path(exists=True, dir_okay=False),
              help="Calibration text file: " + ", ".join(n for n, c in CARDS.items() if c.calibration != "unused")
                   + " and --kv-cache int8 [builtin:pydoc without its held-out tail].")
@click.option("--eval-text", type=click.Path(exists=True, dir_okay=False),
              help="Text for the perplexity check [the held-out tail of builtin:pydoc].")
@click.option("--max-ppl-increase", type=float, default=None,
              help="Quality budget in percent [" + ", ".join(f"{n} {c.budget_pct:g}" for n, c in CARDS.items()) + "].")
@click.option("--force", is_flag=True, help="Keep a result that is over its quality budget.")
@click.option("--last-logits-only", is_flag=True,
              help="After measuring quality, restrict the LM head to the last position (faster prefill; fused graphs).")
@click.option("--overwrite", is_flag=True)
@friendly_errors
def quantize(bundle, out, mode, kv_cache, calibration, eval_text, max_ppl_increase, force, last_logits_only, overwrite,
             **recipe_opts):
    """Write a copy of an fp32 bundle in another precision, with its measured quality."""
    from edgegpt.corpus import read_nonempty
    from edgegpt.export.inspect import describe
    from edgegpt.quantize.bundle import quantize_bundle

    quantize_bundle(bundle, out, mode, options=recipe_opts,
                    eval_text=read_nonempty(eval_text, "evaluation") if eval_text else None,
                    calibration=read_nonempty(calibration, "calibration") if calibration else None,
                    max_ppl_increase=max_ppl_increase, force=force, overwrite=overwrite,
                    last_logits_only=last_logits_only, kv_cache=kv_cache)
    click.echo(describe(out))


@main.command()
@click.argument("bundle", type=click.Path(exists=True, file_okay=False))
@click.option("--system", "system_text", default="", help="Text the history starts with.")
@sampling_options
@click.option("--stop", multiple=True, help="Stop string (repeatable) that ends a reply (kept in the history).")
@click.option("--provider", default="cpu", show_default=True)
@click.option("--threads", type=click.IntRange(min=1), default=None, help="Intra-op threads.")
@click.option("--stats", is_flag=True, help="After each reply, print the history's length, the tokens reused from "
                                            "the last turn's KV cache, TTFT and decode speed (to stderr).")
@speculate_option
@friendly_errors
def chat(bundle, system_text, max_new_tokens, temperature, top_k, top_p, repetition_penalty, seed, stop, provider,
         threads, stats, speculate):
    """Continue a history turn by turn: each line on stdin joins it, then the model's reply does.

    The history is kept as token ids. On a --kv-cache shared bundle each turn starts from the last turn's
    KV cache (the runtime's prompt_cache), so only the new line is prefilled. When the history outgrows
    the context, its oldest tokens are dropped (and that turn prefills in full)."""
    from edgegpt.runtime import Generator
    from edgegpt.runtime.chat import Chat

    conversation = Chat(Generator.load(bundle, provider=provider, threads=threads, speculate=speculate),
                        system=system_text,
                        max_new_tokens=max_new_tokens, stop=stop, temperature=temperature, top_k=top_k, top_p=top_p,
                        repetition_penalty=repetition_penalty, seed=seed)
    if stats and not conversation.reuses_cache:
        click.echo("(this bundle keeps a growing KV cache, so every turn prefills the whole history; export "
                   "with --kv-cache shared to reuse it)", err=True)
    for number, raw in enumerate(sys.stdin.buffer, 1):
        try:
            line = raw.decode("utf-8")
        except UnicodeDecodeError as e:
            raise click.ClickException(f"line {number} of the input is not UTF-8 text (byte {e.start}); "
                                       f"send UTF-8") from None
        for piece in conversation.turn(line):
            click.echo(piece, nl=False)
        click.echo()
        if stats:
            click.echo(conversation.stats.line(), err=True)


@main.command(name="eval")
@click.argument("bundle", type=click.Path(exists=True, file_okay=False))
@click.option("--text", "text_path", default="builtin:pydoc-heldout", show_default=True,
              help="Text file, or builtin:pydoc-heldout (the tail of builtin:pydoc the trainer holds out).")
@click.option("--window", type=click.IntRange(min=2), default=None, help="Tokens per window [min(256, context)].")
@click.option("--stride", type=click.IntRange(min=1), default=None, help="Tokens between windows [window / 2].")
@click.option("--max-tokens", type=click.IntRange(min=2), default=4096, show_default=True)
@click.option("--reference", type=click.Path(exists=True, file_okay=False),
              help="Also report KL divergence and top-1 agreement against this bundle (e.g. the fp32 one).")
@friendly_errors
def eval_cmd(bundle, text_path, window, stride, max_tokens, reference):
    """Perplexity of a bundle on a text (strided windows, with the runtime)."""
    from edgegpt.corpus import default_eval_text, read_nonempty
    from edgegpt.quality.evaluate import evaluate

    text = default_eval_text() if text_path == "builtin:pydoc-heldout" else read_nonempty(text_path, "evaluation")
    r = evaluate(bundle, text, window=window, stride=stride, max_tokens=max_tokens, reference=reference)
    line = (f"perplexity {r.perplexity:.4f} over {r.tokens} tokens ({r.windows} windows of {r.window}, "
            f"stride {r.stride})")
    if reference:
        line += f"; vs reference: mean KL {r.kl_mean:.3e}, top-1 agreement {r.top1_agreement:.2%}"
    click.echo(line)


@main.command()
@click.argument("bundles", nargs=-1, required=True, type=click.Path(exists=True, file_okay=False))
@click.option("--workload", metavar="W1..W5", default=None,
              help="A workload of docs/design.md (any case) [W1 when no explicit sizes are given].")
@click.option("--prompt-tokens", type=click.IntRange(min=1), default=None)
@click.option("--new-tokens", type=click.IntRange(min=2), default=None)
@click.option("--batch", type=click.IntRange(1, 256), default=None)
@click.option("--threads", default="2", show_default=True,
              help="Intra-op threads, or several (e.g. 1,2): every system then runs at each count, interleaved, "
                   "and a note names the fastest.")
@click.option("--provider", default="cpu", show_default=True)
@click.option("--warmup", type=click.IntRange(0, 100), default=1, show_default=True)
@click.option("--runs", type=click.IntRange(1, 1000), default=3, show_default=True)
@click.option("--settle", type=click.FloatRange(0, 60), default=0.25, show_default=True,
              help="Seconds of idle before each run, so the previous system's spinning threads are asleep.")
@click.option("--baseline", "baselines", multiple=True, type=click.Choice(["torch", "optimum", "genai"]),
              help="Also time PyTorch eager (transformers generate), Optimum or onnxruntime-genai. Repeatable.")
@click.option("--checkpoint", type=click.Path(exists=True, file_okay=False),
              help="Checkpoint for --baseline torch [the bundle's source].")
@click.option("--gguf", multiple=True, type=click.Path(exists=True, dir_okay=False),
              help="Also time llama.cpp on this GGUF file (scripts/peers/gguf_from_checkpoint.py). Repeatable.")
@click.option("--ct2", multiple=True, type=click.Path(exists=True, file_okay=False),
              help="Also time CTranslate2 on this converted model (scripts/peers/ct2_from_checkpoint.py). Repeatable.")
@click.option("--executorch", multiple=True, type=click.Path(exists=True, dir_okay=False),
              help="Also time ExecuTorch on this .pte (scripts/peers/executorch_from_checkpoint.py). Repeatable.")
@click.option("--genai", "genai_bundles", multiple=True, type=click.Path(exists=True, file_okay=False),
              help="Also time onnxruntime-genai's generator on this bundle (same graph), or on any directory with a "
                   "genai_config.json (scripts/peers/optimum_for_genai.py writes Optimum's). Repeatable.")
@click.option("--sweep-context", default=None, help="Comma-separated contexts, e.g. 128,256,512,1024.")
@click.option("--plot", "plot_path", type=click.Path(dir_okay=False), help="Draw the context sweep to this PNG.")
@click.option("--json", "json_path", type=click.Path(dir_okay=False), help="Write every figure as JSON here.")
@click.option("--roofline", is_flag=True, help="Probe memory bandwidth and report % of the decode bound.")
@click.option("--hugepages", type=click.Choice(["edgegpt", "all", "none"]), default="edgegpt", show_default=True,
              help="Whose worker processes start with GLIBC_TUNABLES=glibc.malloc.hugetlb=1 (huge pages for the "
                   "weights; Linux, glibc >= 2.35): edgegpt's, every system's, or none.")
@click.option("--speculate", metavar="lookup|DRAFT_BUNDLE", default=None,
              help="Also run every --kv-cache shared bundle with full logits speculating (rows '+lookup', '+draft'); "
                   "with lookup, also the peers' own prompt lookup (--gguf, --baseline torch).")
@friendly_errors
def bench(bundles, workload, prompt_tokens, new_tokens, batch, threads, provider, warmup, runs, settle, baselines,
          checkpoint, gguf, ct2, executorch, genai_bundles, sweep_context, plot_path, json_path, roofline, hugepages, speculate):
    """Time bundles (interleaved) on a workload: TTFT, decode tok/s, RSS, size, load time."""
    from edgegpt.bench import report
    from edgegpt.bench.bench import BenchConfig, resolve_workload, run_bench, thread_counts

    sweep = int_list(sweep_context or "", "--sweep-context", "128,256,512")
    if plot_path and not sweep:
        raise click.UsageError("--plot draws the context sweep: add --sweep-context 128,256,...")
    try:
        counts = thread_counts(tuple(int_list(threads, "--threads", "2 or 1,2")))
    except EdgeGPTError as e:
        raise click.UsageError(f"--{e}; e.g. 2 or 1,2") from None
    w = resolve_workload(workload, prompt_tokens, new_tokens, batch)
    cfg = BenchConfig(bundles=list(bundles), workload=w, threads=counts[0] if len(counts) == 1 else counts,
                      provider=provider, warmup=warmup, runs=runs, baselines=tuple(baselines), checkpoint=checkpoint,
                      sweep=sweep, roofline=roofline, gguf=tuple(gguf), ct2=tuple(ct2), settle_s=settle,
                      genai=tuple(genai_bundles), executorch=tuple(executorch), hugepages=hugepages, speculate=speculate)
    from tqdm.auto import tqdm

    bars = []

    def start(total: int):
        bars.append(tqdm(total=total, desc="bench", unit="run", leave=False))
        return lambda label: (bars[0].set_postfix_str(label[:40]), bars[0].update(1))

    try:
        rep = run_bench(cfg, start)
    finally:
        for bar in bars:
            bar.close()
    click.echo(report.render(rep, counts, provider, runs, warmup, settle, hugepages))
    if json_path:
        report.write_json(json_path, rep.data)
    if plot_path:
        report.plot(rep.results, plot_path, f"decode latency vs context ({'/'.join(map(str, counts))} threads, {provider})")
        click.echo(f"plot: {plot_path}")
    if rep.failures:
        raise click.ClickException(f"{len(rep.failures)} of {len(rep.results)} systems were not measured: "
                                   f"{rep.failures[0]}")


if __name__ == "__main__":
    from edgegpt.launch import main as launch

    launch()
