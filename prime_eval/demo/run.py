"""`run_demo`: the demo's seven steps in order, with their timings, into one output folder."""
from __future__ import annotations

import os
import shutil
import time
from pathlib import Path

from prime_eval.demo import numerics
from prime_eval.demo.bounds import bound_vs_entropy
from prime_eval.demo.generation import generation_settings, make_task, run_generation, truth_summary
from prime_eval.demo.models import ensure_models
from prime_eval.demo.report import build_report, run_labels, write_summary
from prime_eval.demo.scoring import accuracy_rows, score_model
from prime_eval.demo.settings import FAMILIES, LABELS, default_cache_dir, default_settings
from prime_eval.demo.trained_audit import run_audit
from prime_eval.synthetic import generate, write_heldout, write_tasks

OUTPUT_DIRS = ("runs", "data", "plots", "generation")
OUTPUT_FILES = ("report.md", "report.tex", "report.html", "accuracy.csv", "paired.csv", "perplexity.csv",
                "demo_accuracy.csv", "demo_entropy.csv", "demo_generation.csv", "demo.json")


def clean_outputs(out: Path) -> None:
    """Remove what a previous demo run wrote into `out` (only our own files and folders, and only where a
    demo.json says a demo wrote there), so that no file of an older run survives next to the new ones."""
    if not (out / "demo.json").is_file():
        return
    for sub in OUTPUT_DIRS:
        if (out / sub).is_dir():
            shutil.rmtree(out / sub)
    for name in OUTPUT_FILES:
        (out / name).unlink(missing_ok=True)


def run_demo(out: str | Path = "reports/demo", *, cache_dir: str | Path | None = None, seed: int = 0,
             quick: bool = False, retrain: bool = False, threads: int | None = None, console=None) -> dict:
    """Run steps 1-7; returns the summary written to `out/demo.json`. The lm-eval adapters must be registered
    (`import model_adapters`, as `prime-eval demo` does)."""
    import torch
    from rich.console import Console

    from prime_eval.ppl_progress import PplProgressBar

    if console is None:
        console = Console(stderr=True)
        if not console.is_terminal:
            console = Console(stderr=True, width=160)
    # One thread by default: on a 2-core machine shared with anything else, torch's second OpenMP thread spins at
    # barriers and makes small models several times slower (measured); --threads 2 helps only on an idle machine.
    torch.set_num_threads(int(threads) if threads else 1)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    t_start = time.perf_counter()
    out = Path(out)
    cache = Path(cache_dir) if cache_dir else default_cache_dir()
    settings = default_settings(seed, quick)
    gen_settings = generation_settings(quick)
    timings: dict[str, float] = {}
    clean_outputs(out)
    out.mkdir(parents=True, exist_ok=True)
    data_dir, runs_dir = out / "data", out / "runs"

    def step(n: int, text: str) -> float:
        console.rule(f"[bold]{n}/7[/] {text}", align="left")
        return time.perf_counter()

    t = step(1, "ground truth: a random automaton language, its corpora, exact NLLs and tasks")
    with console.status("sampling documents, exact likelihoods by the forward algorithm ..."):
        data = generate(settings.language, settings.n_train, settings.n_heldout, settings.n_task_items)
        task_files = write_tasks(data.tasks, data_dir, data_dir / "tasks")
        write_heldout(data.heldout, data_dir / "heldout.jsonl")
        gen_items = make_task(data.language, settings.seed, gen_settings, data_dir)
    ds = data.summary()
    h = ds["heldout"]
    console.print(f"{ds['n_words']} words, {ds['n_states']} hidden states; {ds['train_docs']:,} training documents "
                  f"({ds['train_bytes'] / 1e6:.1f} MB); true entropy on {h['docs']} held-out documents: "
                  f"{h['nats_per_doc']:.2f} ± {h['nats_per_doc_se']:.2f} nats/doc, {h['bits_per_byte']:.4f} bits/byte")
    for task, s in ds["tasks"].items():
        console.print(f"  {task}: {s['docs']} questions, Bayes-optimal accuracy {100 * s['bayes_acc']:.1f}% "
                      f"(expected {100 * s['bayes_expected']:.1f}%), chance {100 * s['chance']:.0f}%")
    timings["ground_truth"] = time.perf_counter() - t

    t = step(2, "tokenizer and reference models (ARM, MDM, MDM-Prime-v2)")
    kernels = numerics.state()
    if not kernels["pinned"]:
        console.print(f"[yellow]note:[/] float kernels torch {kernels['torch_cpu_capability']}, "
                      f"MKL_CBWR={kernels['MKL_CBWR']}, not the pinned AVX2 ones (prime_eval/demo/numerics.py): "
                      "the models and numbers reproduce on this CPU, not necessarily on others")
    art = ensure_models(settings, data, cache, console, retrain=retrain)
    models = {f: {"params": art.train_log["models"][f]["params"], "checkpoint": str(art.checkpoints[f]),
                  "train_seconds": art.train_log["models"][f]["seconds"],
                  "loss_last": art.train_log["models"][f]["loss_last"]} for f in FAMILIES}
    console.print(("loaded from cache " if art.cached else "trained and cached in ") + str(art.folder)
                  + f" ({art.train_log['seconds']:.0f} s of training when built)")
    timings["models"] = time.perf_counter() - t

    t = step(3, "zero-shot scores through lm-eval (adapters arm, mdm, prime)")
    results = {}
    for fam in FAMILIES:
        console.print(f"scoring {LABELS[fam]} ...")
        path = score_model(fam, art, settings, data_dir / "tasks", runs_dir / "lm_eval", list(task_files))
        results[fam] = str(Path(path).resolve().relative_to(out.resolve()))  # inside --out, wherever that is
    timings["score"] = time.perf_counter() - t

    t = step(4, "generation through lm-eval (generate_until) against the true language")
    from transformers import AutoTokenizer

    generation = run_generation(art, settings, gen_settings, data.language, gen_items, data_dir / "tasks",
                                out / "generation", out, console)
    generation["truth"] = truth_summary(gen_items, AutoTokenizer.from_pretrained(str(art.tokenizer_dir)),
                                        gen_settings)
    timings["generation"] = time.perf_counter() - t

    t = step(5, "bound perplexity of every estimator against the exact NLL")
    bounds = bound_vs_entropy(art, settings, data, runs_dir / "ppl", console,
                              progress_bar=lambda label: PplProgressBar(console, label=label))
    timings["perplexity"] = time.perf_counter() - t

    t = step(6, "exact audit (generic cases and the trained networks)")
    with console.status("enumerating mask sets and reveal orders ..."):
        audit_res = run_audit(art, settings, data)
    timings["audit"] = time.perf_counter() - t

    t = step(7, "report")
    from prime_eval import report as rp

    summary = {"kind": "prime-eval/demo", "version": 2, "settings": settings.as_dict(),
               "training_key": settings.training_key(), "numerics": kernels, "cache": str(art.folder),
               "cached": art.cached,
               "data": ds, "models": models, "train_log": {k: v for k, v in art.train_log.items() if k != "settings"},
               "results_files": results, "generation": generation, "bounds": bounds, "audit": audit_res, "timings": timings}
    collection = rp.load([runs_dir], run_labels(summary))
    summary["accuracy"] = accuracy_rows(collection, data)
    written, rep = build_report(summary, runs_dir, out, collection)
    timings["report"] = time.perf_counter() - t
    timings["total"] = time.perf_counter() - t_start
    write_summary(summary, out)

    rp.render_console(rp.Report(title=rep.title, tables=rep.tables[:2], notes=[]), console)
    console.print(f"[bold]{len(written) + 1} files[/] in {out}/ after {timings['total']:.0f} s "
                  f"({'models from cache' if art.cached else 'models trained'}).")
    console.print(f"[bold green]Report:[/] {(out / 'report.html').resolve()}  (also report.md, report.tex, CSVs, "
                  "plots/, demo.json)")
    return summary
