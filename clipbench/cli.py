"""Command line: ``clipbench run | datasets | models | report | compare | train-tiny``."""

from __future__ import annotations

import argparse
import gc
import json
import logging
import os
import sys
from pathlib import Path
from typing import TYPE_CHECKING

from clipbench import __version__
from clipbench.errors import ClipbenchError

if TYPE_CHECKING:  # imported lazily at run time, so that `clipbench --help` stays light
    from clipbench.config import ModelChoice, RunConfig

log = logging.getLogger("clipbench")


def _csv_list(text: str) -> list[str]:
    return [t.strip() for t in text.split(",") if t.strip()]


def _int_list(text: str) -> list[int]:
    try:
        return [int(t) for t in _csv_list(text)]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None


def _add_common_data_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--data-root", type=Path, default=None,
                   help="where datasets are looked up (default: $CLIPBENCH_DATA_ROOT, else <cache-dir>/data)")
    p.add_argument("--cache-dir", type=Path, default=None,
                   help="feature cache and generated data (default: $CLIPBENCH_CACHE, else ~/.cache/clipbench)")


def _build_parser() -> argparse.ArgumentParser:
    from clipbench.config import BAD_IMAGE_POLICIES, DEVICES, PRECISIONS, PROBE_FEATURES, PROBE_SOLVERS, PROTOCOLS, RunConfig
    from clipbench.tasks import task_names

    default = RunConfig.default
    parser = argparse.ArgumentParser(
        prog="clipbench",
        description="Evaluate CLIP-like models with the CLIP paper's protocols.",
    )
    parser.add_argument("--version", action="version", version=f"clipbench {__version__}")
    parser.add_argument("-v", "--verbose", action="count", default=0, help="more logging (-vv: debug)")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")

    run = sub.add_parser(
        "run", help="evaluate models on datasets and write result records",
        description="Evaluate one or more models. With no --model, evaluates the embedded default: the tiny CLIP "
                    "trained on clipbench's synthetic world, on the synthetic datasets (works offline).",
    )
    run.add_argument("--model", nargs="+", default=None, metavar="MODEL[,PRETRAINED]",
                     help="one or more models, evaluated one after another: an open_clip name or OpenAI "
                          "alias (ViT-B/32, RN50, ...) or a backend-prefixed name (`clipbench models`), "
                          "optionally with ,PRETRAINED; default: clipbench-tiny")
    run.add_argument("--models", type=Path, default=None, metavar="FILE",
                     help="file of models to evaluate, one MODEL[,PRETRAINED] per line (# comments; "
                          "clip_benchmark's --pretrained_model files), after those of --model")
    run.add_argument("--pretrained", default=None,
                     help="pretrained tag, hf-hub:ORG/REPO, or a local checkpoint path (for every model "
                          "that does not give its own ,PRETRAINED)")
    run.add_argument("--datasets", nargs="+", default=None,
                     help="dataset names, groups (paper, imagenet-shifts, retrieval, ...) or spec files; "
                          "default: the synthetic datasets for the embedded model, else 'paper retrieval'")
    run.add_argument("--tasks", type=_csv_list, default=None,
                     help=f"comma-separated subset of {','.join(task_names())} (default: zeroshot,"
                          "linear_probe,retrieval; the embedded default runs all but the opt-in prompt_study)")
    _add_common_data_args(run)
    run.add_argument("--output", type=Path, default=default("output"),
                     help="records go here (default: %(default)s/)")
    run.add_argument("--batch-size", type=int, default=default("batch_size"))
    run.add_argument("--workers", type=int, default=default("workers"), help="DataLoader worker processes")
    run.add_argument("--device", choices=DEVICES, default=default("device"))
    run.add_argument("--precision", choices=PRECISIONS, default=default("precision"),
                     help="default: the protocol's (paper: amp, datacomp: fp32)")
    run.add_argument("--protocol", choices=list(PROTOCOLS), default=default("protocol"),
                     help="paper: the CLIP paper's protocol; datacomp: DataComp's 38-task evaluation "
                          "(fp32 without autocast, its data copies, prompts and main metrics)")
    run.add_argument("--seed", type=int, default=default("seed"))
    run.add_argument("--force", action="store_true",
                     help="recompute records that exist with the same settings (records made under "
                          "other settings are always recomputed; the old ones are kept)")
    run.add_argument("--no-download", action="store_true", help="never download data or weights")
    run.add_argument("--probe-solver", choices=PROBE_SOLVERS, default=default("probe_solver"),
                     help="linear-probe solver: scikit-learn (the paper's, default) or torch L-BFGS (GPU)")
    run.add_argument("--probe-features", choices=PROBE_FEATURES, default=default("probe_features"),
                     help="image features for linear probes (the paper: before the projection)")
    run.add_argument("--probe-jobs", type=int, default=default("probe_jobs"),
                     help="threads fitting sweep points in parallel (speed only: the sklearn probe's "
                          "numbers do not depend on it)")
    run.add_argument("--few-shot", type=_int_list, default=None, metavar="K,K,...",
                     help="also run few-shot probes with these shots per class (default when few_shot "
                          f"runs: {','.join(map(str, default('few_shot_k')))})")
    run.add_argument("--few-shot-seeds", type=int, default=default("few_shot_seeds"))
    run.add_argument("--recall-k", type=_int_list, default=default("recall_k"), metavar="K,K,...")
    run.add_argument("--bootstrap", type=int, default=default("n_bootstrap"),
                     help="bootstrap resamples for the 95%% CI (0: none)")
    run.add_argument("--templates", type=Path, default=None, help="file of prompt templates ({c} placeholder)")
    run.add_argument("--classnames", type=Path, default=None, help="file of class names, one per line")
    run.add_argument("--no-shared-decode", dest="shared_decode", action="store_false",
                     help="load and evaluate the models one at a time, even those with the same "
                          "preprocessing (which by default share one decoding pass while they fit)")
    run.add_argument("--language", nargs="+", default=None, metavar="LANG", dest="languages",
                     help="the languages of the text (captions, class names, templates) to evaluate, e.g. "
                     "`--language en de zh`: each dataset runs once per language it offers (its spec's "
                     "`languages:`), records of other languages than a spec's own are named DATASET@LANG; "
                     "default: each dataset's own language only")
    run.add_argument("--on-bad-image", choices=BAD_IMAGE_POLICIES, default=default("on_bad_image"),
                     help="an image that cannot be read: fail its split, naming the files (default: "
                          "%(default)s), or skip those samples (records list them)")
    run.add_argument("--max-image-pixels", type=int, default=default("max_image_pixels"), metavar="N",
                     help="decompression-bomb guard: images over 2*N pixels are refused as unreadable "
                          "(default: Pillow's own limit; 0: no limit)")
    run.add_argument("--decode", default=default("decode"), metavar="{pil,torchvision}",
                     help="pil (default): Pillow decodes and the model's transform runs in the loader "
                          "workers; torchvision: JPEGs decoded by torchvision.io and resized, cropped and "
                          "normalized on the model's device (GPU decode on CUDA; other images decoded by "
                          "Pillow; slightly other pixels, so other cache entries and records)")

    ds = sub.add_parser("datasets", help="list dataset specs and whether their data is present")
    ds.add_argument("--json", action="store_true", help="machine-readable output")
    _add_common_data_args(ds)

    sub.add_parser("models", help="list model names, aliases and pretrained tags")

    from clipbench import compare, report

    report.register_cli(sub)
    compare.register_cli(sub)

    train = sub.add_parser("train-tiny", help="train the embedded tiny CLIP on the synthetic world",
                           add_help=False)
    train.add_argument("rest", nargs=argparse.REMAINDER)
    return parser


def _data_root(args: argparse.Namespace) -> Path:
    from clipbench.config import RunConfig

    return RunConfig(data_root=args.data_root, cache_dir=args.cache_dir).resolved().data_root


def _model_choices(args: argparse.Namespace) -> tuple[str | None, str | None, list[ModelChoice] | None]:
    """``(model, pretrained, models)`` for :class:`RunConfig`: one model as before, several as a list.

    Raises:
        ClipbenchError: a malformed ``--model`` value or ``--models`` file (naming the line).
    """
    from clipbench.config import parse_model_choice, read_models_file

    choices = [parse_model_choice(text, args.pretrained) for text in args.model or ()]
    if args.models is not None:
        choices += read_models_file(args.models, args.pretrained)
    if not choices:
        return None, args.pretrained, None  # the embedded default (--pretrained may pick its weights)
    if len(choices) == 1:
        return choices[0].name, choices[0].pretrained, None
    return None, None, choices


def config_from_args(args: argparse.Namespace) -> RunConfig:
    """The :class:`~clipbench.config.RunConfig` of `clipbench run` flags (nothing resolved yet)."""
    from clipbench.config import RunConfig

    model, pretrained, models = _model_choices(args)
    tasks = list(args.tasks) if args.tasks is not None else None
    if args.few_shot:
        tasks = tasks if tasks is not None else list(RunConfig(model=model, models=models).resolved().tasks)
        tasks += [] if "few_shot" in tasks else ["few_shot"]
    return RunConfig(
        model=model, pretrained=pretrained, models=models, datasets=args.datasets, tasks=tasks,
        data_root=args.data_root, output=args.output, cache_dir=args.cache_dir, batch_size=args.batch_size,
        workers=args.workers, device=args.device, precision=args.precision, protocol=args.protocol, seed=args.seed,
        force=args.force, allow_download=not args.no_download, probe_solver=args.probe_solver,
        probe_features=args.probe_features, probe_jobs=args.probe_jobs,
        few_shot_k=args.few_shot or RunConfig.default("few_shot_k"),
        few_shot_seeds=args.few_shot_seeds, recall_k=args.recall_k, n_bootstrap=args.bootstrap,
        templates_file=args.templates, classnames_file=args.classnames, on_bad_image=args.on_bad_image,
        max_image_pixels=args.max_image_pixels, shared_decode=args.shared_decode, decode=args.decode,
        languages=[t for item in args.languages for t in _csv_list(item)] if args.languages else None,
    )


def cmd_run(args: argparse.Namespace) -> int:
    from clipbench.pipeline import run

    config = config_from_args(args)
    outcome = run(config)
    if outcome.records:
        from clipbench.report import summary_table

        print(summary_table([r.to_dict() for r in outcome.records]))
        print(f"\nRecords: {Path(config.output).resolve()}")
    if outcome.failures:
        several = config.models is not None  # set only for several models
        loads = [f for f in outcome.failures if f.task == "load"]
        if loads and not several:  # the one model could not be loaded, so nothing else ran
            print(f"error: {loads[0].message}", file=sys.stderr)
            return 2
        print(f"\n{len(outcome.failures)} failure(s):", file=sys.stderr)
        for failure in outcome.failures:
            owner = f"{failure.model}: " if several else ""
            what = "could not be loaded" if failure.task == "load" else f"{failure.dataset}/{failure.task}"
            print(f"- {owner}{what}: {failure.message}", file=sys.stderr)
        return 2
    return 0


def cmd_datasets(args: argparse.Namespace) -> int:
    from tabulate import tabulate

    from clipbench.data import data_status
    from clipbench.specs import list_specs

    data_root = _data_root(args)
    rows = []
    for spec in list_specs():
        status = data_status(spec, data_root)
        rows.append({
            "name": spec.name, "title": spec.title, "tasks": list(spec.tasks),
            "classes": spec.num_classes, "primary_metric": spec.primary_metric,
            "source": f"{spec.source.type}:{spec.source.path}", "groups": list(spec.groups),
            "languages": list(spec.available_languages),
            "present": status.present, "location": status.location,
            "how_to_get": status.how_to_get if not status.present else "",
        })
    if args.json:
        print(json.dumps(rows, indent=2))
        return 0
    table = [[r["name"], r["title"], ",".join(r["tasks"]), r["classes"] or "", r["primary_metric"],
              r["source"], ",".join(r["groups"]), "yes" if r["present"] else "no"] for r in rows]
    print(tabulate(table, headers=["name", "title", "tasks", "classes", "metric", "source", "groups", "local"]))
    several = [r for r in rows if len(r["languages"]) > 1]
    if several:
        print("\nLanguages (--language; records of other languages than the first are DATASET@LANG):")
        for r in several:
            print(f"- {r['name']}: {' '.join(r['languages'])}")
    missing = [r for r in rows if not r["present"] and r["how_to_get"]]
    if missing:
        print(f"\nData root: {data_root}. Missing datasets and how to get them:")
        for r in missing:
            print(f"- {r['name']}: {r['how_to_get']}")
    return 0


def cmd_models(args: argparse.Namespace) -> int:
    from tabulate import tabulate

    from clipbench.models import backends, model_table

    print("Model backends (--model PREFIX:NAME; no prefix: open_clip):")
    for backend in backends():
        print(f"- {backend.prefix}: {backend.naming or '(no naming help registered)'}")
    print("\nopen_clip models:")
    rows = [(r.name, ", ".join(r.aliases), ", ".join(r.tags) or "(random init or --pretrained PATH)")
            for r in model_table()]
    print(tabulate(rows, headers=["model", "OpenAI alias", "pretrained tags"]))
    print("\n--pretrained also takes hf-hub:ORG/REPO or a local checkpoint path.")
    return 0


#: libgomp's wait policy for the model's CPU threads unless the environment sets one: idle threads
#: sleep instead of spinning, which on shared cores took CPU from the DataLoader workers decoding
#: the next batch (benchmarks/feature_throughput.py, docs/architecture.md "Threads"); it changes
#: no number, only how threads wait
OMP_WAIT_POLICY = "PASSIVE"


def entry() -> None:
    """The ``clipbench`` command (and ``python -m clipbench``): :func:`main`, then exit with its code."""
    code = main()
    # What is alive now lives until exit anyway: frozen, it is skipped by the collections of the
    # interpreter's shutdown, which with torch and open_clip loaded take ~1 s on 2 CPU cores
    # (0.2 s frozen); atexit handlers and logging's flush still run
    gc.freeze()
    sys.exit(code)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    # read once, when torch loads its OpenMP runtime: set before anything imports torch
    os.environ.setdefault("OMP_WAIT_POLICY", OMP_WAIT_POLICY)
    if argv[:1] == ["train-tiny"]:
        from clipbench.train_tiny import main as train_main

        return int(train_main(argv[1:]) or 0)
    from clipbench.plugins import load_plugins

    try:
        load_plugins()  # before the parser: plugin tasks are valid --tasks values
    except ClipbenchError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    parser = _build_parser()
    args = parser.parse_args(argv)
    level = (logging.WARNING, logging.INFO, logging.DEBUG)[min(args.verbose, 2)]
    logging.basicConfig(level=level, format="%(levelname)s %(name)s: %(message)s")
    if args.command is None:
        parser.print_help()
        return 1
    handlers = {"run": cmd_run, "datasets": cmd_datasets, "models": cmd_models}
    try:
        if args.command in handlers:
            return handlers[args.command](args)
        return int(args.handler(args) or 0)
    except ClipbenchError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted; completed records and cache entries are kept, a rerun resumes", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
