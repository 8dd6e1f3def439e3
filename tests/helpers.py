"""Helpers shared by the test modules (test modules import this, never each other): paths, tiny
configs, the CLI entry point, a WordPiece tokenizer, a packed MedPix subset, a shard edited by hand,
and the batch-contract checks every backend must pass."""

from __future__ import annotations

import csv
import gc
import io
import json
import os
import subprocess
import sys
import tarfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.multiprocessing as mp
from PIL import Image

from unimlip_fast.train.distributed import free_port

REPO = Path(__file__).resolve().parents[1]
# The real data sets (MedPix, VQA-RAD, NIH): ../shared/data beside the checkout, or wherever
# UNIMLIP_SHARED_DATA points (a GPU machine gets them carried into the checkout: bench/gpu_carry.sh).
SHARED_DATA = Path(os.environ.get("UNIMLIP_SHARED_DATA") or REPO.parent / "shared" / "data")

TINY_OVERRIDES = [
    "model.embed_dim=32",
    "model.image_size=64",
    "model.vision_layers=[1,1,1,1]",
    "model.vision_width=16",
    "model.fusion_layers=1",
    "model.fusion_heads=4",
    "model.simclr_hidden=64",
    "model.simclr_out=16",
    "model.text.encoder=random-bert",
    "model.text.context_length=24",
    "model.text.vocab_size=256",
    "model.text.hidden_size=32",
    "model.text.num_layers=1",
    "model.text.num_heads=4",
    "model.kernels=reference",
]

TINY_RUN = TINY_OVERRIDES + [
    "data.format=phantom",
    "data.phantom_size=96",
    "data.num_workers=0",
    "train.batch_size=16",
    "train.log_every=1",
    "train.warmup_steps=2",
    "train.simclr_start=3",
    "train.lr=1e-3",
]

CAPTIONS = [
    f"{modality} of the {region} showing {count} {size} lesions in the {position}"
    for modality in ("ct", "mri")
    for region in ("head", "chest", "abdomen")
    for count in ("one", "two")
    for size in ("small", "large")
    for position in ("upper left", "lower right")
]  # 48 distinct captions


def medpix_path() -> Path:
    path = SHARED_DATA / "medpix2"
    if not path.is_dir():
        pytest.skip(f"real MedPix data not found at {path} (../shared/data beside the repo, or $UNIMLIP_SHARED_DATA)")
    return path


def run_cli(monkeypatch, *args) -> int:
    """``unimlip-fast ARGS`` through the CLI's entry point; its exit code."""
    from unimlip_fast.cli import main

    monkeypatch.setattr(sys, "argv", ["unimlip-fast", *map(str, args)])
    with pytest.raises(SystemExit) as e:
        main()
        raise SystemExit(0)
    return e.value.code


def pretrain_tiny(monkeypatch, run_dir, *overrides) -> int:
    """``unimlip-fast pretrain`` of the demo recipe made tiny (``TINY_RUN``), fp32 under ZeRO-2, into
    ``run_dir``, with ``overrides`` last; its exit code."""
    recipe, ds_config = REPO / "configs/demo.yaml", REPO / "configs/zero2_fp32.json"
    return run_cli(
        monkeypatch, "pretrain", recipe, "--ds-config", ds_config, "--run-dir", run_dir, *TINY_RUN, *overrides
    )


@contextmanager
def small_file_system(path: Path, size_mb: int) -> Iterator[Path]:
    """A tmpfs of ``size_mb`` MB mounted at ``path`` (a real full disk, not an injected error); the
    test skips where this process may not mount one (not root, or a container without CAP_SYS_ADMIN)."""
    path.mkdir(parents=True, exist_ok=True)
    try:
        mounted = subprocess.run(
            ["mount", "-t", "tmpfs", "-o", f"size={size_mb}m", "tmpfs", str(path)], capture_output=True, text=True
        )
    except FileNotFoundError:
        pytest.skip(f"cannot mount a {size_mb} MB tmpfs here: no mount command")
    if mounted.returncode:
        pytest.skip(f"cannot mount a {size_mb} MB tmpfs here: {mounted.stderr.strip() or mounted.returncode}")
    try:
        yield path
    finally:
        gc.collect()  # a failed write's open file, kept by its traceback's frames (in a cycle), closes
        subprocess.run(["umount", str(path)], check=True)


def read_metrics(run_dir):
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def make_run_folder(run_dir: Path, overrides: list[str], captions: list[str] = CAPTIONS, seed: int = 0) -> Path:
    """A finished run folder as pretraining leaves it (config, weights, tokenizer, text config,
    summary), holding a freshly initialised model: what loading needs, in seconds."""
    import json

    from safetensors.torch import save_file

    from unimlip_fast.config import load_config, save_config
    from unimlip_fast.model import build_model, build_tokenizer
    from unimlip_fast.run_folder import RunFolder

    cfg = load_config(None, overrides)
    torch.manual_seed(seed)
    tokenizer = build_tokenizer(cfg.model.text, captions)
    model = build_model(cfg.model, cfg.loss, tokenizer)
    for m in model.modules():  # non-trivial BatchNorm statistics and last-BN weights, as after training
        if isinstance(m, torch.nn.modules.batchnorm._BatchNorm):
            m.running_mean.uniform_(-0.2, 0.2)
            m.running_var.uniform_(0.5, 1.5)
            torch.nn.init.uniform_(m.weight, 0.5, 1.5)
    run_dir.mkdir(parents=True, exist_ok=True)
    save_config(cfg, run_dir / "config.yaml")
    RunFolder(run_dir).save_text_artifacts(model, tokenizer)
    save_file({k: v.detach().contiguous() for k, v in model.state_dict().items()}, str(run_dir / "model.safetensors"))
    (run_dir / "summary.json").write_text(json.dumps({"steps": 0, "retrieval": {}}))
    return run_dir


# ------------------------------------------------------------------------------------- tokenizers

WORDS = "the of a ct mri chest head lesion small large left right upper lower showing in on x ray two one".split()
PIECES = ["##s", "##ing", "##al", "##do", "##men", "ab", "-", ".", ",", ":"]


def wordpiece_tokenizer(tmp_path):
    """A tiny BERT WordPiece tokenizer over :data:`WORDS` and :data:`PIECES`."""
    from transformers import BertTokenizerFast

    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"] + WORDS + PIECES
    (tmp_path / "vocab.txt").write_text("\n".join(vocab) + "\n")
    return BertTokenizerFast(str(tmp_path / "vocab.txt"))


# ------------------------------------------------------------------------- packed shards, backends

N_PACKED = 96  # MedPix train records packed for the backend tests
IMAGE_SIZE = 64
CONTEXT = 24
B = 16  # per-rank batch of the backend tests


def _dali_available() -> bool:
    from unimlip_fast.data.dali import dali_available

    return dali_available()


# The backends that read packed shards; DALI's cases skip where it does not import.
GPU_BACKENDS = [
    "torch",
    pytest.param(
        "dali",
        marks=pytest.mark.skipif(not _dali_available(), reason="nvidia.dali does not import (pip install '.[dali]')"),
    ),
]


def train_loader(backend: str, dataset, batch: int = B, shards=None, **spec):
    """``build_train_loader`` with a :class:`LoaderSpec` of ``batch`` and IMAGE_SIZE; ``spec``: its other fields."""
    from unimlip_fast.data.backends import build_train_loader
    from unimlip_fast.data.spec import LoaderSpec

    return build_train_loader(backend, dataset, LoaderSpec(batch, IMAGE_SIZE, **spec), shards=shards)


def shard_loader(backend: str, shards: Path, batch: int = B, **spec):
    """A ``backend`` loader over the packed folder ``shards`` (no dataset to check against)."""
    from unimlip_fast.data.shards import open_shards

    return train_loader(backend, None, batch, shards=open_shards(shards), **spec)


def copy_packed(packed: Path, dest: Path) -> Path:
    import shutil

    shutil.copytree(packed, dest)
    return dest


def tiny_tokenizer_dir(root: Path) -> Path:
    """The tokenizer a tiny random-bert run on MedPix train builds (same captions, same vocabulary)."""
    from unimlip_fast.config import load_config
    from unimlip_fast.data.sources import read_records
    from unimlip_fast.model import build_tokenizer

    out = root / "tokenizer"
    if not out.is_dir():
        cfg = load_config(None, TINY_OVERRIDES + ["data.format=medpix", f"data.path={medpix_path()}"])
        captions = [r.caption for r in read_records(cfg.data, "train").items]
        build_tokenizer(cfg.model.text, captions).save_pretrained(str(out))
    return out


def pack_medpix(root: Path, n: int = N_PACKED, shard_size: int = 40) -> Path:
    from unimlip_fast.config import DataConfig
    from unimlip_fast.data.pack import PackOptions, pack

    out = root / "shards"
    pack(
        DataConfig(format="medpix", path=str(medpix_path())),
        out,
        str(tiny_tokenizer_dir(root)),
        "train",
        PackOptions(shard_size=shard_size, context_length=CONTEXT, workers=1, limit=n, progress=False),
    )
    return out


def rewrite_shard(
    tar_path: Path,
    corrupt: set[str] = frozenset(),
    drop: set[str] = frozenset(),
    replace: dict[str, bytes] | None = None,
) -> None:
    """Rewrite a tar in place: members named in ``corrupt`` get garbage bytes, those in ``drop`` go,
    those in ``replace`` get the bytes given."""
    with tarfile.open(tar_path, "r:") as tar:
        members = [(m, tar.extractfile(m).read()) for m in tar.getmembers()]
    with tarfile.open(tar_path, "w", format=tarfile.USTAR_FORMAT) as tar:
        for m, data in members:
            if m.name in drop:
                continue
            if m.name in corrupt:
                data = b"\x00garbage, not an image" * 20
            data = (replace or {}).get(m.name, data)
            m.size = len(data)
            tar.addfile(m, io.BytesIO(data))


def first_member_names(shards: Path, shard: int = 0) -> list[str]:
    index = (shards / f"shard-{shard:06d}.idx").read_text().split("\n")[1:]
    return [line.split()[3].split(".")[0] for line in index if line]


def check_contract(batch: dict, batch_size: int, strong: bool, mlm: bool, dtype=torch.float32) -> None:
    keys = {"image", "input_ids", "attention_mask", "index", "skipped"}
    keys |= {"image_a", "image_b"} if strong else set()
    keys |= {"mlm_labels"} if mlm else set()
    assert set(batch) == keys, set(batch) ^ keys
    for key in ("image", "image_a", "image_b"):
        if key in batch:
            x = batch[key]
            assert x.shape == (batch_size, 3, IMAGE_SIZE, IMAGE_SIZE) and x.dtype == dtype
            assert torch.isfinite(x).all()
            # CLIP-normalised [0,1] pixels lie within [-1.8, 2.2]
            assert -1.85 < float(x.min()) and float(x.max()) < 2.2 and float(x.float().std()) > 0.1
    assert batch["input_ids"].shape == batch["attention_mask"].shape == (batch_size, CONTEXT)
    assert batch["input_ids"].dtype == batch["attention_mask"].dtype == torch.int64
    assert set(batch["attention_mask"].unique().tolist()) <= {0, 1}
    assert (batch["attention_mask"][:, 0] == 1).all()
    assert batch["index"].dtype == torch.int64 and batch["index"].shape == (batch_size,)
    if strong:
        assert not torch.allclose(batch["image"], batch["image_a"])
        assert not torch.allclose(batch["image_a"], batch["image_b"])
    if mlm:
        labels = batch["mlm_labels"]
        assert labels.shape == (batch_size, CONTEXT) and ((labels != -100).sum(1) >= 1).all()


def epoch(loader) -> list[dict]:
    return [b for b in loader]


def same_batches(a: list[dict], b: list[dict]) -> bool:
    if len(a) != len(b):
        return False
    for x, y in zip(a, b):
        for key in x:
            if key == "skipped":
                if x[key] != y[key]:
                    return False
            elif not torch.equal(x[key], y[key]):
                return False
    return True


def tokenised_captions(shards: Path) -> dict[int, tuple[list[int], str]]:
    """``record index -> (ids of the caption, caption)`` computed afresh with the packed tokenizer."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(shards / "tokenizer"))
    out = {}
    for tar_path in sorted(shards.glob("shard-*.tar")):
        with tarfile.open(tar_path) as tar:
            for m in tar.getmembers():
                if m.name.endswith(".txt"):
                    caption = tar.extractfile(m).read().decode()
                    ids = tok(caption, truncation=True, max_length=CONTEXT)["input_ids"]
                    out[int(m.name.split(".")[0])] = (ids, caption)
    return out


def manifest(shards: Path) -> dict:
    return json.loads((shards / "manifest.json").read_text())


def unpadded(ids: torch.Tensor, mask: torch.Tensor) -> list[list[int]]:
    return [row[m.bool()].tolist() for row, m in zip(ids.cpu(), mask.cpu())]


def run_args(shards: Path, backend: str, run_dir: Path) -> list:
    return [
        "pretrain",
        REPO / "configs/demo.yaml",
        "--ds-config",
        REPO / "configs/zero2.json",
        "--run-dir",
        run_dir,
        *TINY_OVERRIDES,
        "data.format=medpix",
        f"data.path={medpix_path()}",
        f"data.shards={shards}",
        f"data.backend={backend}",
        "data.num_workers=0",
        "train.batch_size=16",
        "train.max_steps=4",
        "train.simclr_start=2",
        "train.log_every=1",
        "train.warmup_steps=1",
        "eval.split=",
        "train.ckpt_every=0",
    ]


# ------------------------------------------------------------------ downstream release shapes
def write_image(path: Path, seed: int, size: int = 40, bright: bool = False) -> None:
    """A noisy grey image; ``bright`` ones carry a white square (something a model can learn)."""
    rng = np.random.default_rng(seed)
    a = rng.integers(0, 90, (size, size), dtype=np.uint8)
    if bright:
        a[size // 4 : 3 * size // 4, size // 4 : 3 * size // 4] = 255
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(a, "L").save(path)


def finetuning_base_run(folder: Path) -> Path:
    """A finished pretraining run folder with a tiny random model at 32 px, its tokenizer knowing
    a few question words too (what fine-tuning loads)."""
    return make_run_folder(
        folder,
        TINY_OVERRIDES + ["model.image_size=32"],
        CAPTIONS + ["is there a lesion in the chest", "yes no left right"],
    )


def _chexpert_row(path: str, frontal: bool, values: dict) -> dict:
    from unimlip_fast.data.labelled import CHEXPERT_LABELS

    row = {
        "Path": path,
        "Sex": "Male",
        "Age": "60",
        "Frontal/Lateral": "Frontal" if frontal else "Lateral",
        "AP/PA": "AP",
    }
    row.update({label: values.get(label, "") for label in CHEXPERT_LABELS})
    return row


def write_chexpert(root: Path, n_patients: int = 12, bad_rows: bool = True) -> Path:
    """``root/CheXpert-v1.0-small/{train,valid}.csv`` with images; Cardiomegaly = a bright image.
    Train patient k has 2 frontal studies and one lateral image; bad rows: a missing image and an
    unknown label value."""
    from unimlip_fast.data.labelled import CHEXPERT_LABELS

    release = root / "CheXpert-v1.0-small"
    fields = ["Path", "Sex", "Age", "Frontal/Lateral", "AP/PA", *CHEXPERT_LABELS]
    for split, n in (("train", n_patients), ("valid", max(4, n_patients // 3))):
        rows = []
        for p in range(n):
            for study in (1, 2):
                rel = f"CheXpert-v1.0-small/{split}/patient{p:05d}/study{study}/view1_frontal.jpg"
                positive = (p + study) % 2 == 0
                write_image(root / rel, seed=p * 10 + study + (0 if split == "train" else 1000), bright=positive)
                rows.append(
                    _chexpert_row(
                        rel,
                        True,
                        {
                            "Cardiomegaly": "1.0" if positive else "0.0",
                            "Edema": "-1.0" if p % 3 == 0 else "",
                            "No Finding": "" if positive else "1.0",
                        },
                    )
                )
            lateral = f"CheXpert-v1.0-small/{split}/patient{p:05d}/study1/view2_lateral.jpg"
            write_image(root / lateral, seed=p)
            rows.append(_chexpert_row(lateral, False, {"Cardiomegaly": "1.0"}))
        if bad_rows:
            rows.append(_chexpert_row(f"CheXpert-v1.0-small/{split}/patient99999/study1/view1_frontal.jpg", True, {}))
            good = rows[0]["Path"]
            rows.append(_chexpert_row(good, True, {"Cardiomegaly": "maybe"}))
        with open(release / f"{split}.csv", "w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=fields)
            writer.writeheader()
            writer.writerows(rows)
    return release


def write_mimic(root: Path) -> Path:
    """MIMIC-CXR-JPG's three CSVs (split and metadata gzipped, as released) and images for 6 subjects."""
    import gzip

    from unimlip_fast.data.labelled import CHEXPERT_LABELS

    label_rows, split_rows, meta_rows = [], [], []
    for s in range(6):
        subject, study = f"1{s:07d}", f"5{s:07d}"
        split = "train" if s < 4 else ("validate" if s == 4 else "test")
        label_rows.append(
            {
                "subject_id": subject,
                "study_id": study,
                **{lab: "" for lab in CHEXPERT_LABELS},
                "Edema": "-1.0",
                "Cardiomegaly": "1.0" if s % 2 else "0.0",
            }
        )
        for view, dicom in (("PA", f"d{s}pa"), ("LATERAL", f"d{s}lat"), ("AP", f"d{s}ap")):
            split_rows.append({"dicom_id": dicom, "study_id": study, "subject_id": subject, "split": split})
            meta_rows.append({"dicom_id": dicom, "subject_id": subject, "study_id": study, "ViewPosition": view})
            if dicom != "d0ap":  # one frontal image missing on disk
                write_image(root / "files" / f"p{subject[:2]}" / f"p{subject}" / f"s{study}" / f"{dicom}.jpg", s)
    split_rows.append({"dicom_id": "orphan", "study_id": "59999999", "subject_id": "19999999", "split": "train"})
    meta_rows.append({"dicom_id": "orphan", "subject_id": "19999999", "study_id": "59999999", "ViewPosition": "PA"})

    def write(name: str, rows: list[dict], gz: bool) -> None:
        opener = gzip.open(root / f"{name}.gz", "wt", newline="") if gz else open(root / name, "w", newline="")
        with opener as f:
            writer = csv.DictWriter(f, fieldnames=list(rows[0]))
            writer.writeheader()
            writer.writerows(rows)

    write("mimic-cxr-2.0.0-chexpert.csv", label_rows, gz=False)
    write("mimic-cxr-2.0.0-split.csv", split_rows, gz=True)
    write("mimic-cxr-2.0.0-metadata.csv", meta_rows, gz=True)
    return root


def write_slake(root: Path, n_images: int = 8) -> Path:
    """SLAKE-shaped ``{train,validate,test}.json`` and ``imgs/xmlabN/source.jpg``: English and
    Chinese questions, a few bad records; closed answers follow the image (bright -> yes)."""
    qid = 0
    for split, images in (("train", range(n_images)), ("validate", range(2)), ("test", range(n_images, n_images + 4))):
        rows = []
        for i in images:
            bright = i % 2 == 0
            write_image(root / "imgs" / f"xmlab{i}" / "source.jpg", seed=i, bright=bright)
            for lang in ("en", "zh"):
                qid += 1
                rows.append(
                    {
                        "img_id": i,
                        "img_name": f"xmlab{i}/source.jpg",
                        "question": "Is there a lesion?",
                        "answer": " Yes" if bright else "No ",
                        "q_lang": lang,
                        "answer_type": "CLOSED",
                        "content_type": "Abnormality",
                        "modality": "CT",
                        "location": "Chest",
                        "qid": qid,
                    }
                )
            rows.append(
                {
                    "img_id": i,
                    "img_name": f"xmlab{i}/source.jpg",
                    "question": "Which side?",
                    "answer": "Left" if i % 3 else "Right",
                    "q_lang": "en",
                    "answer_type": "OPEN",
                    "qid": qid,
                }
            )
        rows.append(
            {
                "img_id": 99,
                "img_name": "xmlab99/source.jpg",
                "question": "Is this CT?",
                "answer": "Yes",
                "q_lang": "en",
                "answer_type": "CLOSED",
                "qid": -1,
            }
        )
        rows.append(
            {
                "img_id": 0,
                "img_name": "xmlab0/source.jpg",
                "question": "  ",
                "answer": "Yes",
                "q_lang": "en",
                "answer_type": "CLOSED",
                "qid": -2,
            }
        )
        if split == "test":
            rows.append(
                {
                    "img_id": n_images,
                    "img_name": f"xmlab{n_images}/source.jpg",
                    "question": "Which organ?",
                    "answer": "Spleen",
                    "q_lang": "en",
                    "answer_type": "OPEN",
                    "qid": -3,
                }
            )
        (root / f"{split}.json").write_text(json.dumps(rows))
    return root


# ------------------------------------------------------------------ processes as ranks
def spawn_ranks(worker, world: int, *args, accelerator: str = "cpu") -> None:
    """``worker(rank, world, *args)`` in ``world`` spawned processes, each set up as its rank of a
    process group: the environment torch.distributed reads (127.0.0.1, a free port), DeepSpeed's
    ``accelerator``, one CPU thread. The worker itself calls ``init_distributed()``."""
    mp.spawn(_as_rank, args=(worker, world, free_port(), accelerator, args), nprocs=world, join=True)


def _as_rank(rank: int, worker, world: int, port: int, accelerator: str, args: tuple) -> None:
    os.environ.update(
        RANK=str(rank),
        WORLD_SIZE=str(world),
        LOCAL_RANK=str(rank),
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(port),
        DS_ACCELERATOR=accelerator,
    )
    torch.set_num_threads(1)
    worker(rank, world, *args)


def cli_ranks(args: list, world: int, logs: Path) -> list[subprocess.Popen]:
    """``unimlip-fast ARGS`` as ``world`` processes, each its rank of one job as a launcher or a
    cluster scheduler starts them (the environment of :func:`spawn_ranks`, one CPU thread each), each
    in a session of its own (a signal sent to one reaches that rank alone); rank R's stderr goes to
    ``logs/rankR.err``."""
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1", "DS_ACCELERATOR": "cpu"}
    env.update(WORLD_SIZE=str(world), MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port()))
    procs = []
    for rank in range(world):
        with open(logs / f"rank{rank}.err", "w") as err:
            procs.append(
                subprocess.Popen(
                    [sys.executable, "-m", "unimlip_fast.cli", *map(str, args)],
                    env={**env, "RANK": str(rank), "LOCAL_RANK": str(rank)},
                    stdout=subprocess.DEVNULL,
                    stderr=err,
                    start_new_session=True,
                )
            )
    return procs


def pmc_clip_checkpoint(model, vocab: int, width: int, embed: int, layers: int, seed: int = 0) -> dict:
    """PMC-CLIP's state dict: its ModifiedResNet and BERT (the same architectures as ours, taken from
    ``model``), and its own fusion, projections and logit scale at PMC-CLIP's shapes, random values."""
    import math

    g = torch.Generator().manual_seed(seed)
    r = lambda *shape: torch.randn(*shape, generator=g) * 0.2
    state = {f"module.{k}": v.clone() for k, v in model.state_dict().items() if k.startswith("visual.")}
    state.update(
        {
            f"module.text_encoder.{k.removeprefix('text.encoder.')}": v.clone()
            for k, v in model.state_dict().items()
            if k.startswith("text.encoder.")
        }
    )
    state["module.text_encoder.pooler.dense.weight"] = r(width, width)  # BertModel's pooler, unused
    state["module.text_projection"] = r(width, embed)
    state["module.logit_scale"] = torch.tensor(math.log(1 / 0.07))  # 0-dim, as PMC-CLIP stores it
    state["module.img_special_token"] = r(1, 1, embed)
    state["module.mlm_projection"] = r(width, vocab)
    state["module.positional_embedding"] = r(77, width)  # defined, unused on PMC-CLIP's BERT path
    state["module.ln_final.weight"], state["module.ln_final.bias"] = r(width), r(width)  # likewise
    for i in range(layers):
        block = f"module.fusion_module.resblocks.{i}."
        state.update(
            {
                block + "attn.in_proj_weight": r(3 * width, width),
                block + "attn.in_proj_bias": r(3 * width),
                block + "attn.out_proj.weight": r(width, width),
                block + "attn.out_proj.bias": r(width),
                block + "ln_1.weight": 1 + r(width),
                block + "ln_1.bias": r(width),
                block + "ln_2.weight": 1 + r(width),
                block + "ln_2.bias": r(width),
                block + "mlp.c_fc.weight": r(4 * width, width),
                block + "mlp.c_fc.bias": r(4 * width),
                block + "mlp.c_proj.weight": r(width, 4 * width),
                block + "mlp.c_proj.bias": r(width),
            }
        )
    return state
