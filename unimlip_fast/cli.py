"""The ``unimlip-fast`` command line: thin commands over library calls.

Errors reach the user as one clear line and a non-zero exit code; set UNIMLIP_DEBUG=1 for the
traceback.
"""

from __future__ import annotations

import json
import os
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.table import Table
from typer.core import TyperCommand, TyperGroup, TyperOption

from .config import DATA_FORMATS, DEFAULT_RECIPE, PACK_FORMATS
from .console import make_console


class _FlagsTakeNoValue:
    """typer's rich help prints a flag's type (``--overwrite <bool>``) as if the flag took a value;
    a flag given an empty metavar is printed as its name alone (``--overwrite``, ``--x/--no-x``).
    Applied to every parameter a command has, --help included, when click asks for them."""

    def get_params(self, ctx: typer.Context) -> list:
        params = super().get_params(ctx)
        for param in params:
            if isinstance(param, TyperOption) and param.is_flag and param.metavar is None:
                param.metavar = ""
        return params


class _Command(_FlagsTakeNoValue, TyperCommand):
    pass


class _Group(_FlagsTakeNoValue, TyperGroup):
    pass


class _Typer(typer.Typer):
    """A typer app whose groups and commands print flags without a value placeholder."""

    def __init__(self, **kwargs) -> None:
        super().__init__(cls=_Group, **kwargs)

    def command(self, name: Optional[str] = None, **kwargs) -> Callable:
        return super().command(name, cls=kwargs.pop("cls", _Command), **kwargs)


app = _Typer(
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    help="High-throughput Uni-Mlip pretraining and evaluation.",
)
eval_app = _Typer(no_args_is_help=True, help="Evaluate a trained model.")
data_app = _Typer(no_args_is_help=True, help="Prepare data sets.")
app.add_typer(eval_app, name="eval")
app.add_typer(data_app, name="data")
finetune_app = _Typer(no_args_is_help=True, help="Fine-tune a pretraining run on a downstream task.")
app.add_typer(finetune_app, name="finetune")
console = make_console()


def _print_version(value: bool) -> None:
    if value:
        from . import __version__

        typer.echo(f"unimlip-fast {__version__}")
        raise typer.Exit()


@app.callback()
def _options(
    version: Annotated[
        bool, typer.Option("--version", callback=_print_version, is_eager=True, help="Print the version and exit.")
    ] = False,
) -> None:
    """High-throughput Uni-Mlip pretraining and evaluation."""


CHECKPOINT_SPECS = "pmc-clip:PATH, or open_clip:hf-hub:ORG/NAME | local-dir:DIR | MODEL_NAME:WEIGHTS"

DsConfigOpt = Annotated[
    Optional[Path],
    typer.Option(
        "--ds-config", help="DeepSpeed JSON (ZeRO stage, precision): a path, or the name of a shipped one (zero2.json)."
    ),
]
RunDirOpt = Annotated[Optional[Path], typer.Option("--run-dir", help="Run folder (default runs/<name>).")]


def _quiet_libraries() -> None:
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    import transformers

    transformers.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    import logging

    logging.getLogger("DeepSpeed").setLevel(logging.WARNING)


@contextmanager
def stopped_on_a_signal_exits_130() -> Iterator[None]:
    """A training run stopped on SIGINT or SIGTERM exits 130; each rank says so in its own log, unless
    the trainer already did (a stop mid-run says where; one too late to cut the run short, here)."""
    from .train.stopping import TrainingStopped

    try:
        yield
    except TrainingStopped as e:
        if not e.announced:
            console.print(str(e), highlight=False)
        raise typer.Exit(130) from None


@app.command()
def pretrain(
    config: Annotated[
        Optional[str],
        typer.Argument(
            help=f"Recipe YAML/JSON: a path, or the name of a shipped one (demo.yaml, medpix_cpu.yaml, paper.yaml); "
            f"left out: {DEFAULT_RECIPE}.",
            show_default=False,
        ),
    ] = None,
    overrides: Annotated[Optional[list[str]], typer.Argument(help="Dotted overrides, e.g. train.max_steps=30.")] = None,
    ds_config: DsConfigOpt = None,
    run_dir: RunDirOpt = None,
    resume: Annotated[Optional[str], typer.Option("--resume", help="'latest' or a checkpoint tag.")] = None,
    overwrite: Annotated[
        bool,
        typer.Option(
            "--overwrite", help="Start over in a run folder that holds a run (deletes its checkpoints and metrics)."
        ),
    ] = False,
) -> None:
    """Pretrain Uni-Mlip.

    Example: unimlip-fast pretrain configs/demo.yaml --ds-config zero2.json train.max_steps=30
    """
    from .config import find_config_file, load_config
    from .data.records import describe_skips

    overrides = list(overrides or [])
    if config is not None and "=" in config and not Path(config).exists():  # an override, CONFIG left out
        config, overrides = None, [config, *overrides]
    cfg = load_config(config or DEFAULT_RECIPE, overrides)
    _quiet_libraries()
    from .train.engine import pretrain as run_pretrain

    ds_path = find_config_file(ds_config) if ds_config else None
    with stopped_on_a_signal_exits_130():
        summary = run_pretrain(cfg, str(ds_path) if ds_path else None, run_dir, resume, overwrite)
    if os.environ.get("RANK", "0") != "0":
        return
    if "retrieval" in summary:
        print_retrieval(summary["retrieval"])
    console.print(
        f"run folder: {summary['run_dir']}  steps: {summary['steps']}  "
        f"wall time: {_duration(summary['wall_s'])}  "
        f"skipped records: {describe_skips(summary['skipped_records']) or 'none'}  "
        f"skipped samples: {describe_skips(summary['skipped_samples']) or 'none'}  "
        f"non-finite steps: {summary['nonfinite_steps']}",
        highlight=False,
    )


@app.command()
def plan(
    config: Annotated[str, typer.Argument(help="Recipe YAML/JSON: a path, or the name of a shipped one.")],
    overrides: Annotated[Optional[list[str]], typer.Argument(help="Dotted overrides.")] = None,
    ds_config: DsConfigOpt = None,
    gpu: Annotated[
        str,
        typer.Option(
            "--gpu", help="The card: v100-16gb, v100-32gb, a100-40gb, a100-80gb, h100-80gb, h200, l40s, rtx-4090."
        ),
    ] = "h100-80gb",
    gpus: Annotated[int, typer.Option("--gpus", min=1, help="GPUs in the run.")] = 1,
    mfu: Annotated[
        float, typer.Option("--mfu", min=0.01, max=1.0, help="Model FLOPs utilisation the predicted time assumes.")
    ] = 0.35,
    link: Annotated[
        Optional[str],
        typer.Option(
            "--link",
            help="The link ZeRO's collectives run on (nvlink2-4, pcie3-5, ib-edr/hdr/ndr); default: the card's.",
        ),
    ] = None,
    samples: Annotated[
        Optional[int], typer.Option("--samples", help="Samples per epoch (default: known for pmc-oa).")
    ] = None,
    as_json: Annotated[bool, typer.Option("--json", help="The plan as JSON on stdout.")] = False,
) -> None:
    """Fit, largest micro-batch, memory by kind, predicted time and ZeRO traffic per card, from one step traced
    with fake tensors: no weights downloaded, no data read, no GPU needed.

    Example: unimlip-fast plan configs/paper.yaml --ds-config zero2_bf16.json --gpu v100-32gb --gpus 8
    """
    from .config import find_config_file, load_config
    from .plan import Assumptions, find_card
    from .plan import plan as make_plan
    from .plan.report import show_plan
    from .train.ds_config import load_ds_config

    card = find_card(gpu)
    cfg = load_config(config, list(overrides or []))
    _quiet_libraries()
    ds = load_ds_config(str(find_config_file(ds_config)) if ds_config else None)
    result = make_plan(
        cfg,
        ds,
        card,
        gpus,
        Assumptions(mfu=mfu, link=link, samples=samples),
        log=(lambda line: None) if as_json else (lambda line: console.print(line, highlight=False)),
    )
    if as_json:
        print(json.dumps(result.as_dict(), indent=2))
    else:
        show_plan(result, make_console(stderr=False), config)


@app.command()
def ablate(
    config: Annotated[Path, typer.Argument(help="Recipe YAML/JSON; it needs eval.split for retrieval.")],
    overrides: Annotated[Optional[list[str]], typer.Argument(help="Dotted overrides for every run.")] = None,
    table: Annotated[
        str,
        typer.Option(
            "--table",
            help="The paper's Table 3 (BatchNorm statistics and SimCLR), "
            "4 (each term added to ITC + MLM), or 3,4 (their rows shared).",
        ),
    ] = "3",
    seeds: Annotated[int, typer.Option("--seeds", help="Runs per row, seeds train.seed, train.seed + 1, ...")] = 1,
    out: Annotated[
        Optional[Path],
        typer.Option("--out", help="Folder for the base, the runs and the tables (default runs/ablate_<name>)."),
    ] = None,
    base: Annotated[
        Optional[Path],
        typer.Option(
            "--base",
            help="The ITC + MLM model every row continues: a "
            "finished run folder or a PMC-CLIP checkpoint (default: made "
            "once in OUT/base with PMC-CLIP's objective).",
        ),
    ] = None,
    base_epochs: Annotated[
        Optional[int],
        typer.Option("--base-epochs", help="Epochs of the base made in OUT/base (default: the recipe's)."),
    ] = None,
    rows: Annotated[Optional[str], typer.Option("--rows", help="Only these rows, comma-separated keys.")] = None,
    ds_config: DsConfigOpt = None,
) -> None:
    """The paper's ablation tables in its protocol: one ITC + MLM base, every row continued from it,
    N seeds a row, resumable; writes table.md and results.json (R@1/5/10 both ways beside the paper's
    R@1, each row against row 1 with a paired-bootstrap interval and a verdict).

    Example: unimlip-fast ablate configs/medpix_ablation.yaml --table 3,4 --seeds 3 --base-epochs 8
    """
    from .ablation import RESULTS_FILE, TABLE_FILE, AblationPlan, parse_tables, run_ablation
    from .config import load_config

    tables = parse_tables(table)
    folder = out or Path("runs") / f"ablate_{load_config(config, overrides or []).name}"
    _quiet_libraries()
    plan = AblationPlan(
        config,
        tables,
        seeds,
        overrides or [],
        folder,
        str(ds_config) if ds_config else None,
        only=[r.strip() for r in rows.split(",")] if rows else None,
        base=base,
        base_epochs=base_epochs,
    )
    with stopped_on_a_signal_exits_130():
        run_ablation(plan, log=lambda line: console.print(line, highlight=False))
    if os.environ.get("RANK", "0") == "0":
        console.print((folder / TABLE_FILE).read_text(), highlight=False)
        console.print(f"tables: {folder / TABLE_FILE}, {folder / RESULTS_FILE}", highlight=False)


def _duration(seconds: float) -> str:
    """``1h02m03s``, ``21m41s`` or ``7.5s``."""
    if seconds < 60:
        return f"{seconds:.1f}s"
    minutes, sec = divmod(round(seconds), 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours}h{minutes:02d}m{sec:02d}s" if hours else f"{minutes}m{sec:02d}s"


# The keys of a data set's reading that a command taking --data takes from the run it evaluates,
# when the data is the run's own (a CSV's columns, its image folder, its split column).
RUN_DATA_KEYS = ("image_root", "image_key", "caption_key", "split_key")
DATA_KEY_HELP = (
    "KEY=VALUE for a data.* key as pretraining takes it, e.g. image_key=filename caption_key=notes "
    "image_root=DIR (repeatable); the data of the run being evaluated defaults to the run's own keys."
)


def parse_data_spec(spec: str, data_keys: list[str] | None = None, run: Path | None = None):
    """``FORMAT:PATH`` -> DataConfig; ``phantom:N`` is N generated phantom pairs (no files).
    ``data_keys``: ``KEY=VALUE`` (or ``data.KEY=VALUE``) for any ``data.*`` key, as pretraining
    takes them; ``run``: a run folder whose own data this may be, whose reading keys are the defaults."""
    import dataclasses

    from .config import DataConfig, load_schema
    from .run_folder import RunFolder

    base = _parse_data_spec(spec)
    keys = [k.removeprefix("data.") for k in data_keys or []]
    if run is not None and base.path and RunFolder.of(run).config.is_file():
        from .config import load_config

        own = load_config(RunFolder.of(run).config).data
        if own.format == base.format and own.path and Path(own.path).resolve() == Path(base.path).resolve():
            keys = [f"{k}={getattr(own, k)}" for k in RUN_DATA_KEYS if getattr(own, k)] + keys
    if not keys:
        return base
    fields = [
        f"{f.name}={getattr(base, f.name)}"
        for f in dataclasses.fields(DataConfig)
        if f.name in ("format", "path", "phantom_size")
    ]
    return load_schema(DataConfig, None, fields + keys)


def _require_data_path(data_cfg) -> None:
    """A --data path that does not exist, said before the model is loaded (seconds)."""
    if data_cfg.format != "phantom" and not Path(data_cfg.path).exists():
        raise FileNotFoundError(f"--data {data_cfg.format}:{data_cfg.path}: {data_cfg.path} not found")


def _parse_data_spec(spec: str):
    from .config import DataConfig

    fmt, sep, path = spec.partition(":")
    if not sep or fmt not in DATA_FORMATS:
        raise typer.BadParameter(
            f"--data must be FORMAT:PATH with FORMAT one of {', '.join(DATA_FORMATS)} "
            "(phantom:N for N generated phantom pairs)"
        )
    if fmt == "phantom":
        if path and not path.isdigit():
            raise typer.BadParameter(f"--data phantom:N takes a number of pairs, got {path!r}")
        return DataConfig(format="phantom", phantom_size=int(path) if path else 2048)
    if not path:
        raise typer.BadParameter("--data needs a path after the colon")
    return DataConfig(format=fmt, path=path)


@eval_app.command("retrieval")
def eval_retrieval(
    checkpoint: Annotated[
        str, typer.Option("--checkpoint", help=f"Finished run folder (or its weights), export, {CHECKPOINT_SPECS}.")
    ],
    data: Annotated[
        str,
        typer.Option(
            "--data",
            help=f"FORMAT:PATH with FORMAT one of {', '.join(DATA_FORMATS)}, "
            "e.g. medpix:../shared/data/medpix2; phantom:N for N generated phantom pairs.",
        ),
    ],
    split: Annotated[
        str, typer.Option("--split", help="train, dev, test or all (the data set's own split files).")
    ] = "test",
    split_key: Annotated[
        str,
        typer.Option(
            "--split-key", help="csv/jsonl: the column naming each row's split (one file without it is training data)."
        ),
    ] = "",
    json_out: Annotated[Optional[Path], typer.Option("--json", help="Write the results as JSON here.")] = None,
    keep_duplicates: Annotated[
        bool, typer.Option("--keep-duplicates", help="Keep pairs with repeated captions.")
    ] = False,
    roco_protocol: Annotated[bool, typer.Option("--roco-2000", help="ROCO's 2,000-pair test protocol.")] = False,
    batch_size: Annotated[int, typer.Option("--batch-size")] = 128,
    device: Annotated[str, typer.Option("--device", help="auto, cpu or cuda[:N].")] = "auto",
    data_key: Annotated[Optional[list[str]], typer.Option("--data-key", help=DATA_KEY_HELP)] = None,
) -> None:
    """Image-text retrieval: Recall@1/5/10 and ranks, image->text and text->image.

    Example: unimlip-fast eval retrieval --checkpoint runs/medpix --data medpix:../shared/data/medpix2 --split test
    """
    data_cfg = parse_data_spec(data, data_key, checkpoint)
    _require_data_path(data_cfg)
    if split_key:
        data_cfg.split_key = split_key
    _quiet_libraries()
    from .eval.retrieval import RetrievalProtocol, evaluate_loaded_retrieval
    from .loading import load

    trained = load(checkpoint, device)
    results = evaluate_loaded_retrieval(
        trained,
        data_cfg,
        split,
        batch_size,
        RetrievalProtocol(keep_duplicates=keep_duplicates, roco_2000=roco_protocol),
    )
    print_retrieval(results)
    if json_out:
        json_out.parent.mkdir(parents=True, exist_ok=True)
        json_out.write_text(json.dumps(results, indent=2))


@eval_app.command("zeroshot")
def eval_zeroshot(
    checkpoint: Annotated[str, typer.Option("--checkpoint", help=f"Finished run folder, export, {CHECKPOINT_SPECS}.")],
    data: Annotated[str, typer.Option("--data", help="nih|chexpert|mimic|csv:PATH, e.g. nih:../shared/data/nih1000.")],
    split: Annotated[str, typer.Option("--split", help="train, valid or test (not for csv).")] = "test",
    prompts: Annotated[
        Optional[Path], typer.Option("--prompts", help="Prompts JSON (templates and/or per label).")
    ] = None,
    json_out: Annotated[Optional[Path], typer.Option("--json", help="Write the results as JSON here.")] = None,
    batch_size: Annotated[int, typer.Option("--batch-size")] = 64,
    workers: Annotated[int, typer.Option("--workers", help="Image decoding processes.")] = 0,
    device: Annotated[str, typer.Option("--device", help="auto, cpu or cuda[:N].")] = "auto",
) -> None:
    """Zero-shot classification: positive vs negative prompt ensembles per label, macro AUC.

    Example: unimlip-fast eval zeroshot --checkpoint runs/medpix_cpu --data nih:../shared/data/nih1000
    """
    from .data.records import describe_skips
    from .eval.zeroshot import ZEROSHOT_FORMATS

    fmt, sep, path = data.partition(":")
    if not sep or fmt not in ZEROSHOT_FORMATS or not path:
        raise typer.BadParameter(f"--data must be FORMAT:PATH with FORMAT one of {', '.join(ZEROSHOT_FORMATS)}")
    _quiet_libraries()
    from .data.sources import read_labelled
    from .eval.zeroshot import evaluate_zeroshot, read_prompts
    from .loading import load

    labelled = read_labelled(fmt, path, split)
    prompt_sets = read_prompts(prompts, labelled.labels) if prompts else None
    model = load(checkpoint, device)
    results = evaluate_zeroshot(model, labelled, prompt_sets, batch_size, workers)
    results["split"] = split if fmt != "csv" else "all"
    table = Table(
        title=f"zero-shot on {data} ({results['split']}): n={results['n_test']}, macro AUC "
        f"{results['macro_auc']:.4f} (chance 0.5; random rankings: 5th-95th percentile "
        f"{results['chance_macro_auc_p05']:.4f}-{results['chance_macro_auc_p95']:.4f})"
    )
    table.add_column("label")
    table.add_column("positives", justify="right")
    table.add_column("AUC", justify="right")
    for label, auc in results["per_label"].items():
        table.add_row(label, str(results["n_positive"][label]), f"{auc:.4f}")
    make_console(stderr=False).print(table)
    skipped = describe_skips(results["skipped"]) or "none"
    excluded = ", ".join(results["excluded_labels"]) or "none"
    console.print(f"skipped: {skipped}; labels without both classes (no AUC): {excluded}", highlight=False)
    if json_out:
        json_out.parent.mkdir(parents=True, exist_ok=True)
        json_out.write_text(json.dumps(results, indent=2))


@app.command()
def report(
    runs: Annotated[list[Path], typer.Argument(help="Run folder(s); several are drawn on the same axes.")],
    output: Annotated[
        Optional[Path],
        typer.Option(
            "--output",
            help="The HTML file (default RUN/report.html for one run, ./report.html for several); PNGs go beside it.",
        ),
    ] = None,
    data: Annotated[
        Optional[str],
        typer.Option(
            "--data", help="FORMAT:PATH for the gallery, when the run's own data path does not resolve from here."
        ),
    ] = None,
    split: Annotated[
        Optional[str], typer.Option("--split", help="Evaluation split for the gallery (default the run's eval.split).")
    ] = None,
    device: Annotated[str, typer.Option("--device", help="auto, cpu or cuda[:N] (the gallery's embeddings).")] = "cpu",
) -> None:
    """An HTML report of a run: loss terms, throughput, retrieval, a retrieval gallery, the run's facts.

    Example: unimlip-fast report runs/medpix_cpu --data medpix:../shared/data/medpix2
    """
    data_cfg = parse_data_spec(data) if data else None
    _quiet_libraries()
    from .inference import resolve_device
    from .report import write_report

    files = write_report(runs, output, resolve_device(device), data_cfg, split)
    for problem in files.problems:
        console.print(f"[yellow]{problem}[/yellow]", highlight=False)
    console.print(f"report: {files.html} ({len(files.figures)} figures beside it)", highlight=False)


@data_app.command("pack")
def data_pack(
    fmt: Annotated[str, typer.Option("--format", help=f"{', '.join(PACK_FORMATS)}.")],
    input_path: Annotated[Path, typer.Option("--input", help="The data set's folder (or CSV/JSONL file).")],
    output: Annotated[Path, typer.Option("--output", help="Folder for the shards, their indices and manifest.json.")],
    split: Annotated[str, typer.Option("--split", help="train, dev, test or all.")] = "train",
    shard_size: Annotated[int, typer.Option("--shard-size", help="Samples per shard.")] = 1000,
    tokenizer: Annotated[
        str,
        typer.Option(
            "--tokenizer",
            help="Hub name, local folder, or minilm (a random-bert run's tokenizer folder for random-bert).",
        ),
    ] = "minilm",
    context_length: Annotated[int, typer.Option("--context-length")] = 77,
    workers: Annotated[int, typer.Option("--workers", help="Processes packing shards in parallel.")] = max(
        1, (os.cpu_count() or 2) - 1
    ),
    image_root: Annotated[str, typer.Option("--image-root", help="csv/jsonl: image folder.")] = "",
    shuffle_seed: Annotated[
        int, typer.Option("--shuffle-seed", help="Order of records over shards; -1 keeps the source's order.")
    ] = 0,
) -> None:
    """Pack image-caption pairs into webdataset shards with pre-tokenised captions (resumable).

    Example: unimlip-fast data pack --format medpix --input data/medpix2 --output shards/medpix --tokenizer minilm
    """
    from .config import DataConfig
    from .data.pack import PackOptions, pack
    from .data.records import describe_skips

    if fmt not in PACK_FORMATS:
        raise typer.BadParameter(f"--format must be one of {', '.join(PACK_FORMATS)}")
    _quiet_libraries()
    data = DataConfig(format=fmt, path=str(input_path), split=split, image_root=image_root)
    options = PackOptions(shard_size, context_length, workers, shuffle_seed=None if shuffle_seed < 0 else shuffle_seed)
    manifest = pack(data, output, tokenizer, split, options)
    skipped = describe_skips(manifest["skipped"]) or "none"
    console.print(
        f"{manifest['n_samples']} samples in {len(manifest['shards'])} shards at {output}; "
        f"tokenizer {tokenizer} (vocab {manifest['tokenizer']['vocab_size']}, context {context_length}); "
        f"skipped: {skipped}",
        highlight=False,
    )


@data_app.command("verify")
def data_verify(
    folder: Annotated[Path, typer.Argument(help="A folder made by `data pack`.")],
) -> None:
    """Read every byte of a packed folder: name the samples that changed since packing, the damaged
    ones (ids outside the vocabulary, undecodable images) and missing index files.

    Example: unimlip-fast data verify shards/medpix
    """
    from .data.records import DataError
    from .data.verify import verify_packed

    reports = verify_packed(folder)
    for report in reports:
        console.print(report.describe(), highlight=False, soft_wrap=True)
    bad = [r for r in reports if not r.ok]
    if bad:
        raise DataError(f"{len(bad)} of {len(reports)} shards changed or damaged since packing (listed above)")
    console.print(f"{len(reports)} of {len(reports)} shards unchanged and whole", highlight=False)


def _progress_reporter(label: str):
    """``(done, total)`` -> a rich bar on a terminal, a plain line per 10% otherwise; and its closer."""
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TimeRemainingColumn

    if console.is_terminal:
        bar = Progress(
            "[progress.description]{task.description}",
            BarColumn(),
            MofNCompleteColumn(),
            TimeRemainingColumn(),
            console=console,
        )
        task = bar.add_task(label, total=None)
        bar.start()
        return (lambda done, total: bar.update(task, completed=done, total=total)), bar.stop
    last = [-1]

    def report(done: int, total: int) -> None:
        tenth = 10 * done // max(total, 1)
        if tenth != last[0]:
            last[0] = tenth
            console.print(f"{label}: {done}/{total}", highlight=False)

    return report, lambda: None


@app.command()
def embed(
    checkpoint: Annotated[str, typer.Option("--checkpoint", help=f"Finished run folder, export, {CHECKPOINT_SPECS}.")],
    output: Annotated[Path, typer.Option("--output", help="Index folder (created; an unfinished one resumes).")],
    data: Annotated[
        Optional[str],
        typer.Option(
            "--data", help="FORMAT:PATH, e.g. medpix:../shared/data/medpix2; phantom:N for N generated pairs."
        ),
    ] = None,
    shards: Annotated[Optional[Path], typer.Option("--shards", help="A `data pack` folder instead of --data.")] = None,
    split: Annotated[str, typer.Option("--split", help="With --data: train, dev, test or all.")] = "all",
    storage: Annotated[str, typer.Option("--format", help="npy, or parquet (needs pyarrow).")] = "npy",
    part_size: Annotated[int, typer.Option("--part-size", help="Records per part file.")] = 4096,
    batch_size: Annotated[int, typer.Option("--batch-size")] = 64,
    workers: Annotated[int, typer.Option("--workers", help="Image decoding processes.")] = 2,
    device: Annotated[str, typer.Option("--device", help="auto, cpu or cuda[:N].")] = "auto",
    data_key: Annotated[Optional[list[str]], typer.Option("--data-key", help=DATA_KEY_HELP)] = None,
) -> None:
    """Image and caption embeddings with their keys, in resumable parts.

    Example: unimlip-fast embed --checkpoint runs/medpix_cpu --data medpix:../shared/data/medpix2 --output emb/medpix
    """
    from .data.records import DataError, describe_skips

    if (data is None) == (shards is None):
        raise typer.BadParameter("give exactly one of --data FORMAT:PATH and --shards DIR")
    data_cfg = parse_data_spec(data, data_key, checkpoint) if data else None
    if data_cfg is not None:
        _require_data_path(data_cfg)
    _quiet_libraries()
    from .embed import EmbedOptions, embed_to_index, packed_source, records_source
    from .loading import load

    model = load(checkpoint, device)
    if data_cfg is not None:
        items, n, read_skipped = records_source(data_cfg, split)
        source = f"{data} split={split}"
    else:
        items, n, read_skipped = packed_source(shards)
        source = f"shards:{shards.resolve()}"
    report, close = _progress_reporter("embedding")
    try:
        index = embed_to_index(
            model, items, n, source, output, read_skipped, EmbedOptions(part_size, batch_size, workers, storage, report)
        )
    finally:
        close()
    skipped = describe_skips({**index["read_skipped"], **index["skipped"]}) or "none"
    if index["n_images"] == 0:  # captions alone are no image index: a failure, said in one line
        raise DataError(
            f"no image could be embedded (skipped: {skipped}); {output} holds {index['n_texts']} captions only"
        )
    console.print(
        f"{index['n_images']} images and {index['n_texts']} captions in {len(index['parts'])} parts at "
        f"{output}; skipped: {skipped}",
        highlight=False,
    )


@app.command()
def search(
    index: Annotated[Path, typer.Option("--index", help="Folder written by `unimlip-fast embed`.")],
    text: Annotated[Optional[str], typer.Option("--text", help="Query text.")] = None,
    image: Annotated[Optional[Path], typer.Option("--image", help="Query image.")] = None,
    k: Annotated[int, typer.Option("-k", help="Results to show.")] = 10,
    over: Annotated[
        Optional[str],
        typer.Option("--over", help="image or text embeddings (default: the other modality than the query's)."),
    ] = None,
    checkpoint: Annotated[
        Optional[str], typer.Option("--checkpoint", help="Model for the query (default: the index's).")
    ] = None,
    json_out: Annotated[Optional[Path], typer.Option("--json", help="Write the results as JSON here.")] = None,
    device: Annotated[str, typer.Option("--device", help="auto, cpu or cuda[:N].")] = "auto",
) -> None:
    """Nearest images or captions to a text or an image query.

    Example: unimlip-fast search --index emb/medpix --text "axial ct, hepatic lesion" -k 10
    """
    if (text is None) == (image is None):
        raise typer.BadParameter("give exactly one of --text and --image")
    over = over or ("image" if text is not None else "text")
    if over not in ("image", "text"):
        raise typer.BadParameter("--over must be image or text")
    _quiet_libraries()
    from .embed import read_index, search_index
    from .loading import load

    model = load(checkpoint or read_index(index)["checkpoint"], device)
    query = model.encode_text(text)[0] if text is not None else model.encode_image(image)[0]
    hits = search_index(index, query, over, k)
    table = Table(title=f"{over}s nearest to {text!r}" if text is not None else f"{over}s nearest to {image}")
    for col in ("rank", "score", "key", "caption"):
        table.add_column(col, justify="right" if col in ("rank", "score") else "left")
    for hit in hits:
        table.add_row(str(hit["rank"]), f"{hit['score']:.4f}", hit["key"], hit["caption"][:100])
    make_console(stderr=False).print(table)
    if json_out:
        json_out.write_text(json.dumps(hits, indent=2))


FinetuneCheckpointOpt = Annotated[
    Optional[str],
    typer.Option("--checkpoint", help=f"A finished pretraining run folder, an export, {CHECKPOINT_SPECS}."),
]
FinetuneConfigOpt = Annotated[Optional[Path], typer.Option("--config", help="Fine-tuning recipe YAML/JSON.")]
FinetuneOverridesArg = Annotated[Optional[list[str]], typer.Argument(help="Dotted overrides, e.g. train.epochs=5.")]
JsonOpt = Annotated[Optional[Path], typer.Option("--json", help="Write the results as JSON here.")]


def _finetune_data(spec: str, formats: tuple[str, ...]) -> list[str]:
    fmt, sep, path = spec.partition(":")
    if not sep or fmt not in formats or not path:
        raise typer.BadParameter(f"--data must be FORMAT:PATH with FORMAT one of {', '.join(formats)}")
    return [f"data.format={fmt}", f"data.path={path}"]


def _finetune_run_dir(run_dir: Optional[Path], *parts) -> Path:
    return run_dir or Path("runs") / "-".join(str(p) for p in parts if p != "")


@finetune_app.command("classify")
def finetune_classify(
    data: Annotated[str, typer.Option("--data", help="nih|chexpert|mimic:PATH, e.g. nih:../shared/data/nih1000.")],
    checkpoint: FinetuneCheckpointOpt = None,
    overrides: FinetuneOverridesArg = None,
    fraction: Annotated[
        Optional[float], typer.Option("--fraction", help="Share of the training labels: 0.01, 0.1, 1.0.")
    ] = None,
    config: FinetuneConfigOpt = None,
    json_out: JsonOpt = None,
    run_dir: RunDirOpt = None,
) -> None:
    """Chest X-ray classification: image encoder + linear layer, macro AUC on the test split.

    Example: unimlip-fast finetune classify --checkpoint runs/medpix_cpu --data nih:../shared/data/nih1000
    --fraction 0.1 --config configs/finetune/classify_cpu.yaml
    """
    from .config import CLASSIFY_FORMATS
    from .finetune.config import load_classify_config

    if checkpoint is None:
        raise typer.BadParameter("--checkpoint RUN is required")
    extra = _finetune_data(data, CLASSIFY_FORMATS) + ([f"data.fraction={fraction}"] if fraction is not None else [])
    cfg = load_classify_config(config, extra + list(overrides or []))
    _quiet_libraries()
    from .finetune.classify import finetune_classify as run
    from .train.distributed import init_distributed

    env = init_distributed()
    out = _finetune_run_dir(
        run_dir, cfg.name, cfg.data.format, f"f{cfg.data.fraction:g}", cfg.train.init, f"s{cfg.train.seed}"
    )
    results = run(cfg, checkpoint, out, env, json_out, echo=lambda m: console.print(m, highlight=False))
    if env.is_main:
        print_classify(results)


@finetune_app.command("vqa")
def finetune_vqa(
    data: Annotated[str, typer.Option("--data", help="vqa-rad|slake:PATH, e.g. vqa-rad:../shared/data/vqa_rad.")],
    checkpoint: FinetuneCheckpointOpt = None,
    overrides: FinetuneOverridesArg = None,
    config: FinetuneConfigOpt = None,
    json_out: JsonOpt = None,
    run_dir: RunDirOpt = None,
    majority: Annotated[
        bool,
        typer.Option("--majority-baseline", help="No model: the most frequent training answer of each answer type."),
    ] = False,
) -> None:
    """Medical VQA as classification over the training answers: accuracy on open, closed, all.

    Example: unimlip-fast finetune vqa --checkpoint runs/medpix_cpu --data vqa-rad:../shared/data/vqa_rad
    --config configs/finetune/vqa_cpu.yaml
    """
    from .config import VQA_FORMATS
    from .finetune.config import load_vqa_config

    if majority:
        from .data.sources import read_qa
        from .finetune.vqa import majority_baseline

        fmt, _, path = data.partition(":")
        _finetune_data(data, VQA_FORMATS)
        results = majority_baseline(read_qa(fmt, path, "train").items, read_qa(fmt, path, "test").items)
        if json_out:
            json_out.parent.mkdir(parents=True, exist_ok=True)
            json_out.write_text(json.dumps(results, indent=2))
        print_vqa(results, "majority answer per answer type")
        return
    if checkpoint is None:
        raise typer.BadParameter("--checkpoint RUN is required (or --majority-baseline)")
    cfg = load_vqa_config(config, _finetune_data(data, VQA_FORMATS) + list(overrides or []))
    _quiet_libraries()
    from .finetune.vqa import finetune_vqa as run
    from .train.distributed import init_distributed

    env = init_distributed()
    out = _finetune_run_dir(run_dir, cfg.name, cfg.data.format, cfg.train.init, f"s{cfg.train.seed}")
    results = run(cfg, checkpoint, out, env, json_out, echo=lambda m: console.print(m, highlight=False))
    if env.is_main:
        print_vqa(results, f"{cfg.data.format}, init {cfg.train.init}, seed {cfg.train.seed}")


def print_classify(results: dict) -> None:
    table = Table(
        title=f"{results['data']} test: n={results['n_test']}, trained on {results['n_train']} images "
        f"(fraction {results['fraction']:g}), init {results['init']}, seed {results['seed']}"
    )
    table.add_column("label")
    table.add_column("AUC", justify="right")
    for label, auc in results["per_label"].items():
        table.add_row(label, f"{auc:.4f}")
    table.add_row("[bold]macro[/bold]", f"[bold]{results['macro_auc']:.4f}[/bold]")
    make_console(stderr=False).print(table)
    if results["excluded_labels"]:
        console.print(
            f"one class only in the test split, left out of the macro AUC: {', '.join(results['excluded_labels'])}",
            highlight=False,
        )
    console.print(
        f"best validation macro AUC {results['val_macro_auc']:.4f} at epoch {results['best_epoch']} "
        f"of {results['epochs_run']}; run folder {results['run_dir']}",
        highlight=False,
    )


def print_vqa(results: dict, title: str) -> None:
    table = Table(
        title=f"VQA test ({title}): n={results['n_test']}, "
        f"{results['n_unseen_answers']} answers unseen in training (counted wrong)"
    )
    for col in ("open", "closed", "overall"):
        table.add_column(col, justify="right")
    table.add_row(*(f"{100 * results[c]:.2f}" for c in ("open", "closed", "overall")))
    make_console(stderr=False).print(table)


@app.command()
def export(
    checkpoint: Annotated[Path, typer.Option("--checkpoint", help="Finished run folder.")],
    output: Annotated[Path, typer.Option("--output", help="Folder to write.")],
    fmt: Annotated[str, typer.Option("--format", help="open_clip.")] = "open_clip",
    hub_id: Annotated[
        Optional[str],
        typer.Option(
            "--hub-id",
            help="ORG/NAME: the Hugging Face repo the folder will "
            "be uploaded to (names a bundled text tower, goes into the model "
            "card).",
        ),
    ] = None,
) -> None:
    """Export a finished run for other tools (open_clip's local-dir folder, with a model card).

    Example: unimlip-fast export --checkpoint runs/medpix_cpu --format open_clip --output export/medpix_cpu
    """
    from .export import EXPORT_FORMATS

    if fmt not in EXPORT_FORMATS:
        raise typer.BadParameter(f"unknown export format {fmt!r}; one of {', '.join(EXPORT_FORMATS)}")
    _quiet_libraries()
    from .export import export as run_export

    folder = run_export(checkpoint, fmt, output, hub_id)
    console.print(
        f"{fmt} export at {folder}: open_clip.create_model_and_transforms('local-dir:{folder}')", highlight=False
    )


def print_retrieval(results: dict) -> None:
    table = Table(
        title=f"retrieval on {results.get('split', '?')}: n={results['n']} "
        f"({results.get('n_duplicates_dropped', 0)} duplicate captions dropped)"
    )
    table.add_column("direction")
    for col in ("R@1", "R@5", "R@10", "median_rank", "mean_rank"):
        table.add_column(col, justify="right")
    for direction in ("i2t", "t2i"):
        m = results[direction]
        table.add_row(direction, *(f"{m[c]:g}" for c in ("R@1", "R@5", "R@10", "median_rank", "mean_rank")))
    make_console(stderr=False).print(table)


def main() -> None:
    """Entry point: one clear line per error (UNIMLIP_DEBUG=1 for the traceback); a command line
    that does not parse exits 2 with its usage, as click's convention."""
    import click

    try:
        code = app(standalone_mode=False)
        if isinstance(code, int) and code:  # in this mode typer returns an exit's code (Ctrl-C: 130)
            sys.exit(code)
    except (typer.Exit, click.exceptions.Exit) as e:
        sys.exit(e.exit_code)
    except (typer.Abort, click.exceptions.Abort) as e:  # click's word for a KeyboardInterrupt
        # a training run stopped on a signal says where it stopped and how to go on
        console.print(str(e.__cause__ or "") or "aborted", highlight=False, soft_wrap=True)
        sys.exit(130)
    except KeyboardInterrupt as e:
        console.print(str(e) or "interrupted", highlight=False, soft_wrap=True)
        sys.exit(130)
    except Exception as e:
        if _is_click_error(e):  # typer vendors its own click: recognised by what it offers
            e.show()
            sys.exit(e.exit_code)
        if os.environ.get("UNIMLIP_DEBUG") == "1":
            raise
        console.print(f"[bold red]error:[/bold red] {_in_words(e)}", highlight=False, soft_wrap=True)
        sys.exit(1)


def _is_click_error(e: Exception) -> bool:
    import click

    return isinstance(e, click.ClickException) or (callable(getattr(e, "show", None)) and hasattr(e, "exit_code"))


def _in_words(e: Exception) -> str:
    """The error's message; the class name only where the message alone would not say what went wrong."""
    message = str(e)
    if "Original Traceback" in message:  # raised in a DataLoader worker: its own message, not the traceback
        last = message.strip().splitlines()[-1]
        message = last.split(": ", 1)[1] if ": " in last else last
    if isinstance(e, FileNotFoundError) and e.filename and str(e.filename) not in message:
        return f"file not found: {e.filename}"
    if isinstance(e, (ValueError, OSError, RuntimeError)) and message:  # ConfigError, DataError, ...: worded
        return message
    return f"{type(e).__name__}: {message}" if message else type(e).__name__


if __name__ == "__main__":
    main()
