"""Small files shaped like the downstream releases, and a tiny finished pretraining run folder."""
from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
from PIL import Image

from unimlip_fast.finetune.readers import CHEXPERT_LABELS

from .helpers import CAPTIONS, TINY_OVERRIDES


def write_image(path: Path, seed: int, size: int = 40, bright: bool = False) -> None:
    """A noisy grey image; ``bright`` ones carry a white square (something a model can learn)."""
    rng = np.random.default_rng(seed)
    a = rng.integers(0, 90, (size, size), dtype=np.uint8)
    if bright:
        a[size // 4: 3 * size // 4, size // 4: 3 * size // 4] = 255
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(a, "L").save(path)


def tiny_run(folder: Path) -> Path:
    """A finished pretraining run folder (what `pretrain` leaves) with a tiny random model."""
    import torch
    from safetensors.torch import save_file

    from unimlip_fast.config import load_config, save_config
    from unimlip_fast.model import build_model, build_tokenizer, save_text_artifacts

    cfg = load_config(None, TINY_OVERRIDES + ["model.image_size=32"])
    tokenizer = build_tokenizer(cfg.model.text, CAPTIONS + ["is there a lesion in the chest", "yes no left right"])
    torch.manual_seed(0)
    model = build_model(cfg.model, cfg.loss, tokenizer)
    folder.mkdir(parents=True, exist_ok=True)
    save_config(cfg, folder / "config.yaml")
    save_text_artifacts(model, tokenizer, folder)
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(folder / "model.safetensors"))
    (folder / "summary.json").write_text(json.dumps({"steps": 0}))
    return folder


def _chexpert_row(path: str, frontal: bool, values: dict) -> dict:
    row = {"Path": path, "Sex": "Male", "Age": "60", "Frontal/Lateral": "Frontal" if frontal else "Lateral",
           "AP/PA": "AP"}
    row.update({label: values.get(label, "") for label in CHEXPERT_LABELS})
    return row


def write_chexpert(root: Path, n_patients: int = 12, bad_rows: bool = True) -> Path:
    """``root/CheXpert-v1.0-small/{train,valid}.csv`` with images; Cardiomegaly = a bright image.
    Train patient k has 2 frontal studies and one lateral image; bad rows: a missing image and an
    unknown label value."""
    release = root / "CheXpert-v1.0-small"
    fields = ["Path", "Sex", "Age", "Frontal/Lateral", "AP/PA", *CHEXPERT_LABELS]
    for split, n in (("train", n_patients), ("valid", max(4, n_patients // 3))):
        rows = []
        for p in range(n):
            for study in (1, 2):
                rel = f"CheXpert-v1.0-small/{split}/patient{p:05d}/study{study}/view1_frontal.jpg"
                positive = (p + study) % 2 == 0
                write_image(root / rel, seed=p * 10 + study + (0 if split == "train" else 1000), bright=positive)
                rows.append(_chexpert_row(rel, True, {"Cardiomegaly": "1.0" if positive else "0.0",
                                                      "Edema": "-1.0" if p % 3 == 0 else "",
                                                      "No Finding": "" if positive else "1.0"}))
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

    label_rows, split_rows, meta_rows = [], [], []
    for s in range(6):
        subject, study = f"1{s:07d}", f"5{s:07d}"
        split = "train" if s < 4 else ("validate" if s == 4 else "test")
        label_rows.append({"subject_id": subject, "study_id": study, **{lab: "" for lab in CHEXPERT_LABELS},
                           "Edema": "-1.0", "Cardiomegaly": "1.0" if s % 2 else "0.0"})
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
                rows.append({"img_id": i, "img_name": f"xmlab{i}/source.jpg", "question": "Is there a lesion?",
                             "answer": " Yes" if bright else "No ", "q_lang": lang, "answer_type": "CLOSED",
                             "content_type": "Abnormality", "modality": "CT", "location": "Chest", "qid": qid})
            rows.append({"img_id": i, "img_name": f"xmlab{i}/source.jpg", "question": "Which side?",
                         "answer": "Left" if i % 3 else "Right", "q_lang": "en", "answer_type": "OPEN", "qid": qid})
        rows.append({"img_id": 99, "img_name": "xmlab99/source.jpg", "question": "Is this CT?", "answer": "Yes",
                     "q_lang": "en", "answer_type": "CLOSED", "qid": -1})
        rows.append({"img_id": 0, "img_name": "xmlab0/source.jpg", "question": "  ", "answer": "Yes",
                     "q_lang": "en", "answer_type": "CLOSED", "qid": -2})
        if split == "test":
            rows.append({"img_id": n_images, "img_name": f"xmlab{n_images}/source.jpg", "question": "Which organ?",
                         "answer": "Spleen", "q_lang": "en", "answer_type": "OPEN", "qid": -3})
        (root / f"{split}.json").write_text(json.dumps(rows))
    return root
