"""Command line: ``clipbench run | datasets | models | report | train-tiny``."""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from pathlib import Path

from . import __version__
from .errors import ClipbenchError
from .paths import default_cache_dir, default_data_root

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


# Kept here rather than imported from clipbench.pipeline so that `clipbench --help` does not load torch.
ALL_TASKS = ("zeroshot", "linear_probe", "few_shot", "retrieval")


def _build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="clipbench",
        description="Evaluate CLIP-like models with the CLIP paper's protocols.",
    )
    parser.add_argument("--version", action="version", version=f"clipbench {__version__}")
    parser.add_argument("-v", "--verbose", action="count", default=0, help="more logging (-vv: debug)")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")

    run = sub.add_parser(
        "run", help="evaluate a model on datasets and write result records",
        description="Evaluate a model. With no --model, evaluates the embedded default: the tiny CLIP "
                    "trained on clipbench's synthetic world, on the synthetic datasets (works offline).",
    )
    run.add_argument("--model", default=None,
                     help="open_clip model name or OpenAI alias (ViT-B/32, RN50, ...); default: clipbench-tiny")
    run.add_argument("--pretrained", default=None,
                     help="pretrained tag, hf-hub:ORG/REPO, or a local checkpoint path")
    run.add_argument("--datasets", nargs="+", default=None,
                     help="dataset names, groups (paper, imagenet-shifts, retrieval, ...) or spec files; "
                          "default: the synthetic datasets for the embedded model, else 'paper retrieval'")
    run.add_argument("--tasks", type=_csv_list, default=None,
                     help=f"comma-separated subset of {','.join(ALL_TASKS)} (default: zeroshot,linear_probe,"
                          "retrieval; the embedded default runs all four)")
    _add_common_data_args(run)
    run.add_argument("--output", type=Path, default=Path("results"), help="records go here (default: results/)")
    run.add_argument("--batch-size", type=int, default=256)
    run.add_argument("--workers", type=int, default=min(4, os.cpu_count() or 1),
                     help="DataLoader worker processes")
    run.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto")
    run.add_argument("--precision", choices=["fp32", "fp16", "bf16", "amp"], default="amp")
    run.add_argument("--seed", type=int, default=0)
    run.add_argument("--force", action="store_true", help="recompute records that already exist")
    run.add_argument("--no-download", action="store_true", help="never download data or weights")
    run.add_argument("--probe-solver", choices=["sklearn", "torch"], default="sklearn",
                     help="linear-probe solver: scikit-learn (the paper's, default) or torch L-BFGS (GPU)")
    run.add_argument("--probe-features", choices=["pre_projection", "projected"], default="pre_projection",
                     help="image features for linear probes (the paper: before the projection)")
    run.add_argument("--few-shot", type=_int_list, default=None, metavar="K,K,...",
                     help="also run few-shot probes with these shots per class (e.g. 1,2,4,8,16)")
    run.add_argument("--few-shot-seeds", type=int, default=3)
    run.add_argument("--recall-k", type=_int_list, default=[1, 5, 10], metavar="K,K,...")
    run.add_argument("--bootstrap", type=int, default=1000, help="bootstrap resamples for the 95%% CI")
    run.add_argument("--templates", type=Path, default=None, help="file of prompt templates ({c} placeholder)")
    run.add_argument("--classnames", type=Path, default=None, help="file of class names, one per line")

    ds = sub.add_parser("datasets", help="list dataset specs and whether their data is present")
    ds.add_argument("--json", action="store_true", help="machine-readable output")
    _add_common_data_args(ds)

    sub.add_parser("models", help="list model names, aliases and pretrained tags")

    from . import report

    report.register_cli(sub)

    train = sub.add_parser("train-tiny", help="train the embedded tiny CLIP on the synthetic world",
                           add_help=False)
    train.add_argument("rest", nargs=argparse.REMAINDER)
    return parser


def _resolve_dirs(args: argparse.Namespace) -> tuple[Path, Path]:
    cache = (args.cache_dir or default_cache_dir()).expanduser()
    data_root = args.data_root or (
        Path(os.environ["CLIPBENCH_DATA_ROOT"]) if os.environ.get("CLIPBENCH_DATA_ROOT")
        else cache / "data" if args.cache_dir else default_data_root()
    )
    return data_root.expanduser(), cache


def cmd_run(args: argparse.Namespace) -> int:
    from . import specs
    from .distributed import DistContext, DistributedError
    from .models import load_model
    from .pipeline import DEFAULT_DATASETS, DEFAULT_MODEL, DEFAULT_PRETRAINED, Evaluator, RunConfig

    data_root, cache = _resolve_dirs(args)
    embedded = args.model is None
    model_name = DEFAULT_MODEL if embedded else args.model
    pretrained = DEFAULT_PRETRAINED if embedded and args.pretrained is None else args.pretrained
    dataset_args = args.datasets or (list(DEFAULT_DATASETS) if embedded else ["paper", "retrieval"])
    tasks = list(args.tasks or (ALL_TASKS if embedded else ("zeroshot", "linear_probe", "retrieval")))
    if args.few_shot and "few_shot" not in tasks:
        tasks.append("few_shot")
    config = RunConfig(
        model=model_name, pretrained=pretrained, datasets=dataset_args, tasks=tasks,
        data_root=data_root, output=args.output, cache_dir=cache, batch_size=args.batch_size,
        workers=args.workers, device=args.device, precision=args.precision, seed=args.seed,
        force=args.force, allow_download=not args.no_download, probe_solver=args.probe_solver,
        probe_features=args.probe_features, few_shot_k=args.few_shot or [1, 2, 4, 8, 16],
        few_shot_seeds=args.few_shot_seeds, recall_k=args.recall_k, n_bootstrap=args.bootstrap,
        templates_file=args.templates, classnames_file=args.classnames,
    )
    unknown = [t for t in tasks if t not in ALL_TASKS]
    if unknown:
        raise ClipbenchError(f"Unknown task(s) {unknown}: choose from zeroshot, linear_probe, few_shot, retrieval.")
    selected = specs.select(dataset_args)
    if not selected:
        raise ClipbenchError(f"No datasets matched {dataset_args}; `clipbench datasets` lists them.")
    # torchrun / srun: rank 0 runs the pipeline, the other ranks encode shards of its splits.
    dist_ctx = DistContext.from_env(args.device)
    try:
        model = dist_ctx.main_first(lambda: load_model(
            model_name, pretrained, device=dist_ctx.device(args.device), precision=args.precision,
            cache_dir=cache, allow_download=not args.no_download))
        dist_ctx.check_same_model(model)
        if not dist_ctx.is_main:
            dist_ctx.serve(model, config)
            return 0
        evaluator = Evaluator(model, config, encoder=dist_ctx.encode if dist_ctx.distributed else None)
        records, failures = [], []
        for spec in selected:
            try:
                records.extend(evaluator.run([spec]))
            except DistributedError:
                raise
            except ClipbenchError as exc:
                failures.append((spec.name, str(exc)))
                log.error("%s: %s", spec.name, exc)
    finally:
        dist_ctx.close()
    if records:
        from .report import summary_table

        print(summary_table([r.to_dict() for r in records]))
        print(f"\nRecords: {Path(args.output).resolve()}")
    if failures:
        print(f"\n{len(failures)} dataset(s) failed:", file=sys.stderr)
        for name, message in failures:
            print(f"- {name}: {message}", file=sys.stderr)
        return 2
    return 0


def cmd_datasets(args: argparse.Namespace) -> int:
    from tabulate import tabulate

    from .data import data_status
    from .specs import list_specs

    data_root, _ = _resolve_dirs(args)
    rows = []
    for spec in list_specs():
        status = data_status(spec, data_root)
        rows.append({
            "name": spec.name, "title": spec.title, "tasks": list(spec.tasks),
            "classes": spec.num_classes, "primary_metric": spec.primary_metric,
            "source": f"{spec.source.type}:{spec.source.path}", "groups": list(spec.groups),
            "present": status.present, "location": status.location,
            "how_to_get": status.how_to_get if not status.present else "",
        })
    if args.json:
        print(json.dumps(rows, indent=2))
        return 0
    table = [[r["name"], r["title"], ",".join(r["tasks"]), r["classes"] or "", r["primary_metric"],
              r["source"], ",".join(r["groups"]), "yes" if r["present"] else "no"] for r in rows]
    print(tabulate(table, headers=["name", "title", "tasks", "classes", "metric", "source", "groups", "local"]))
    missing = [r for r in rows if not r["present"] and r["how_to_get"]]
    if missing:
        print(f"\nData root: {data_root}. Missing datasets and how to get them:")
        for r in missing:
            print(f"- {r['name']}: {r['how_to_get']}")
    return 0


def cmd_models(args: argparse.Namespace) -> int:
    from tabulate import tabulate

    from .models import model_table

    rows = [(r.name, ", ".join(r.aliases), ", ".join(r.tags) or "(random init or --pretrained PATH)")
            for r in model_table()]
    print(tabulate(rows, headers=["model", "OpenAI alias", "pretrained tags"]))
    print("\n--pretrained also takes hf-hub:ORG/REPO or a local checkpoint path.")
    return 0


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["train-tiny"]:
        from .train_tiny import main as train_main

        return int(train_main(argv[1:]) or 0)
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
