"""`vqgan augment`: deterministic, resumable, class-labelled synthetic data that the data specs read back."""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
import tarfile
import time
from pathlib import Path

import pytest
import torch

import stage2_prior.augment as augment_module
from common import sha256_file
from data import build_dataset
from stage1_tokenizer import VQGAN, QuantizerConfig, VQGANConfig
from stage1_tokenizer.encode import encode_dataset
from stage2_prior import GPTPrior, PriorLoadError
from stage2_prior.augment import AugmentError, augment, folder_names
from stage2_prior.images import load_pair
from vqgan.cli import main

REPO = Path(__file__).resolve().parents[1]
PRIOR = ["model.dim=32", "model.depth=2", "model.heads=2", "train.batch_size=8", "train.warmup_steps=2",
         "train.sample_every=1000", "train.checkpoint_every=2", "train.mixed_precision=no"]
NAMES = ["circle", "square", "triangle"]  # synthetic:shapes?classes=3
# one thread: these tiny models gain nothing from two, and on a busy machine two threads of spinning
# OpenMP workers slow every step down ten-fold or more
ONE_THREAD = {**os.environ, "OMP_NUM_THREADS": "1"}


pytestmark = pytest.mark.usefixtures("one_thread")


def _tokenizer() -> VQGAN:
    return VQGAN(VQGANConfig(resolution=16, ch=16, ch_mult=(1, 2), num_res_blocks=1, attn_resolutions=(),
                             z_channels=8, norm_groups=8, quantizer=QuantizerConfig(codebook_size=16, code_dim=4)))


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    root = tmp_path_factory.mktemp("augment")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    torch.manual_seed(0)
    tokenizer = _tokenizer()
    tokenizer.save_pretrained(root / "tokenizer")
    encode_dataset(tokenizer, "synthetic:shapes?size=32&classes=3", root / "codes", progress=False)
    for name, extra in (("prior_run", []), ("uncond_run", ["data.conditional=false"])):
        steps = "train.steps=3" if name == "prior_run" else "train.steps=1"
        assert main(["train-prior", "--config", str(REPO / "configs/tiny.yaml"), *PRIOR, steps, *extra,
                     f"train.out_dir={root / name}", f"data.codes={root / 'codes'}",
                     f"data.tokenizer={root / 'tokenizer'}"]) == 0
    torch.set_num_threads(threads)
    return root


@pytest.fixture(scope="module")
def pair(trained):
    return load_pair(trained / "prior_run" / "prior", trained / "tokenizer")


def _tree(out: Path) -> dict[str, bytes]:
    return {p.relative_to(out).as_posix(): p.read_bytes() for p in sorted(out.rglob("*")) if p.is_file()}


def _check_manifest_matches_disk(out: Path) -> dict:
    """augment.json lists exactly the image files on disk, each with its sha256; returns it."""
    manifest = json.loads((out / "augment.json").read_text())
    assert manifest["complete"] and manifest["count"] == len(manifest["images"])
    on_disk = {p.relative_to(out).as_posix() for p in out.rglob("*") if p.is_file()}
    if manifest["options"]["format"] == "folder":
        assert on_disk - {"augment.json", "classes.json"} == {r["file"] for r in manifest["images"]}
        for r in manifest["images"]:
            assert hashlib.sha256((out / r["file"]).read_bytes()).hexdigest() == r["sha256"]
    else:
        assert on_disk - {"augment.json", "manifest.json"} == {c["shard"] for c in manifest["chunks"]}
        for chunk in manifest["chunks"]:
            assert sha256_file(out / chunk["shard"]) == chunk["shard_sha256"]
            with tarfile.open(out / chunk["shard"]) as tar:
                pngs = {m.name[:-4]: tar.extractfile(m).read() for m in tar.getmembers() if m.name.endswith(".png")}
            records = [r for r in manifest["images"] if r["shard"] == chunk["shard"]]
            assert sorted(pngs) == sorted(r["key"] for r in records)
            for r in records:
                assert hashlib.sha256(pngs[r["key"]]).hexdigest() == r["sha256"]
    return manifest


# ---- prior metadata ----------------------------------------------------------------------------------
def test_prior_keeps_class_names_and_old_checkpoints_load(trained, tmp_path):
    prior_dir = trained / "prior_run" / "prior"
    assert GPTPrior.from_pretrained(prior_dir).class_names == NAMES
    assert GPTPrior.from_pretrained(trained / "uncond_run" / "prior").class_names is None
    old = tmp_path / "old"
    shutil.copytree(prior_dir, old)
    meta = json.loads((old / "config.json").read_text())
    del meta["class_names"]  # a checkpoint from before class names were saved
    (old / "config.json").write_text(json.dumps(meta))
    assert GPTPrior.from_pretrained(old).class_names is None
    meta["class_names"] = ["a", "b"]
    (old / "config.json").write_text(json.dumps(meta))
    with pytest.raises(PriorLoadError, match="class_names.*3 distinct"):
        GPTPrior.from_pretrained(old)


def test_folder_names_are_safe_and_distinct():
    assert folder_names(["cat", "a/b", "a_b", ".hidden", "", "Cat", "Classes.json"]) == \
        ["cat", "a_b", "a_b_002", "hidden", "class_004", "Cat_005", "Classes.json_006"]


# ---- (a) determinism ---------------------------------------------------------------------------------
@pytest.mark.parametrize("output_format", ["folder", "wds"])
def test_same_seed_gives_identical_files(pair, tmp_path, output_format):
    prior, tokenizer = pair
    options = dict(per_class=3, classes=[2, 0], batch_size=2, seed=5, output_format=output_format, progress=False)
    first = augment(prior, tokenizer, tmp_path / "a", **options)
    second = augment(prior, tokenizer, tmp_path / "b", **options)
    assert first["written"] == second["written"] == 6 and first["skipped"] == 0
    assert _tree(tmp_path / "a") == _tree(tmp_path / "b")  # images, shards and manifests, byte for byte
    manifest = _check_manifest_matches_disk(tmp_path / "a")
    assert manifest["options"]["classes"] == [0, 2] and manifest["options"]["cfg_scale"] == 2.0
    assert [(r["class"], r["index"]) for r in manifest["images"]] == [(0, 0), (0, 1), (0, 2), (2, 0), (2, 1), (2, 2)]
    assert len({r["chunk_seed"] for r in manifest["images"]}) == 4  # two chunks per class, each its own seed
    other = augment(prior, tokenizer, tmp_path / "c", **{**options, "seed": 6})
    assert {r["sha256"] for r in other["manifest"]["images"]} != {r["sha256"] for r in manifest["images"]}


def test_chunks_do_not_depend_on_the_other_classes(pair, tmp_path):
    prior, tokenizer = pair
    both = augment(prior, tokenizer, tmp_path / "both", per_class=3, classes=[0, 2], batch_size=2, progress=False)
    alone = augment(prior, tokenizer, tmp_path / "alone", per_class=3, classes=[2], batch_size=2, progress=False)
    assert [r["sha256"] for r in alone["manifest"]["images"]] == \
        [r["sha256"] for r in both["manifest"]["images"] if r["class"] == 2]


# ---- (b) resume --------------------------------------------------------------------------------------
def _cli(trained: Path, out: Path, *extra: str) -> list[str]:
    return [sys.executable, "-m", "vqgan", "augment", "--prior", str(trained / "prior_run" / "prior"),
            "--tokenizer", str(trained / "tokenizer"), "--per-class", "12", "--batch-size", "1", "--seed", "3",
            "--out", str(out), *extra]


def test_resume_after_sigkill_equals_uninterrupted_run(trained, tmp_path):
    total_chunks = 3 * 12
    killed = tmp_path / "killed"
    proc = subprocess.Popen(_cli(trained, killed), cwd=REPO, env=ONE_THREAD, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE)
    at_kill = None
    try:
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline and proc.poll() is None:
            try:
                manifest = json.loads((killed / "augment.json").read_text())
            except (FileNotFoundError, ValueError):
                manifest = None
            if manifest and manifest["chunks"] and not manifest["complete"]:
                proc.kill()  # SIGKILL: no cleanup handlers run
                at_kill = len(manifest["chunks"])
                break
            time.sleep(0.01)
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.wait()
    if at_kill is None:
        pytest.fail(f"the augment run ended (rc {proc.returncode}) before it could be killed; "
                    f"stderr: {proc.stderr.read().decode()[-2000:]}")
    proc.stderr.close()
    interrupted = json.loads((killed / "augment.json").read_text())
    assert not interrupted["complete"] and 1 <= len(interrupted["chunks"]) < total_chunks

    resumed = subprocess.run(_cli(trained, killed), cwd=REPO, env=ONE_THREAD, capture_output=True, text=True,
                             timeout=300)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    skipped = len(interrupted["chunks"])
    assert f"{36 - skipped} images written, {skipped} skipped as already done" in resumed.stdout

    reference = tmp_path / "reference"
    plain = subprocess.run(_cli(trained, reference), cwd=REPO, env=ONE_THREAD, capture_output=True, text=True,
                           timeout=300)
    assert plain.returncode == 0, plain.stderr[-2000:]
    assert "36 images written, 0 skipped" in plain.stdout and "folder:" in plain.stdout
    assert _tree(killed) == _tree(reference)
    _check_manifest_matches_disk(killed)


def test_interrupted_in_process_then_repaired(pair, tmp_path, monkeypatch):
    """An exception after two chunks, then leftovers (a temp file, a stray image, a lost file) are
    cleaned or regenerated: the result equals an uninterrupted run."""
    prior, tokenizer = pair
    options = dict(per_class=3, classes=[0, 1], batch_size=2, seed=1, progress=False)
    reference = tmp_path / "reference"
    augment(prior, tokenizer, reference, **options)

    out, real_write, calls = tmp_path / "out", augment_module._write_chunk, []

    def dying_write(*args, **kwargs):
        if len(calls) == 2:
            raise KeyboardInterrupt
        calls.append(args[2:4])
        return real_write(*args, **kwargs)

    monkeypatch.setattr(augment_module, "_write_chunk", dying_write)
    with pytest.raises(KeyboardInterrupt):
        augment(prior, tokenizer, out, **options)
    monkeypatch.setattr(augment_module, "_write_chunk", real_write)
    partial = json.loads((out / "augment.json").read_text())
    assert not partial["complete"] and [(c["class"], c["chunk"]) for c in partial["chunks"]] == [(0, 0), (0, 1)]
    (out / "circle" / ".circle_000000.png.abc.tmp").write_bytes(b"half")     # a killed atomic write
    (out / "square").mkdir(exist_ok=True)
    (out / "square" / "square_000001.png").write_bytes(b"not recorded")  # a chunk written but not listed
    (out / "circle" / "circle_000002.png").unlink()                     # a recorded chunk lost a file
    result = augment(prior, tokenizer, out, **options)
    assert result["skipped"] == 2 and result["written"] == 4  # chunk (0, 0) kept; (0, 1) regenerated
    assert _tree(out) == _tree(reference)
    _check_manifest_matches_disk(out)
    again = augment(prior, tokenizer, out, **options)
    assert again["written"] == 0 and again["skipped"] == 6 and _tree(out) == _tree(reference)


# ---- (c) reading the output back ----------------------------------------------------------------------
def test_folder_and_wds_output_read_back_with_labels(trained, tmp_path):
    prior, tok = str(trained / "prior_run" / "prior"), str(trained / "tokenizer")
    folder, shards = tmp_path / "folder", tmp_path / "shards"
    for out, fmt in ((folder, "folder"), (shards, "wds")):
        assert main(["augment", "--prior", prior, "--tokenizer", tok, "--per-class", "3", "--classes", "0,2",
                     "--batch-size", "2", "--format", fmt, "--out", str(out)]) == 0
    assert json.loads((folder / "classes.json").read_text()) == NAMES  # every class, in id order

    ds = build_dataset(f"folder:{folder}?val_fraction=0", resolution=16, split="train")
    assert len(ds) == 6
    by_name = sorted((ds.class_names[label], Path(f).parent.name) for f, label in zip(ds.files, ds.labels))
    assert by_name == [("circle", "circle")] * 3 + [("triangle", "triangle")] * 3
    assert ds.class_names == NAMES and sorted(ds.labels) == [0, 0, 0, 2, 2, 2]  # classes.json: the prior's ids
    image, _ = ds[0]
    assert image.shape == (3, 16, 16)

    manifest = _check_manifest_matches_disk(shards)
    assert [c["shard"] for c in manifest["chunks"]] == [f"shard-{i:06d}.tar" for i in range(4)]
    stream = build_dataset(f"wds:{shards}/shard-{{000000..000003}}.tar", resolution=16, split="train")
    assert stream.class_names == NAMES and len(stream) == 6
    labels = sorted(label for _, label in stream)
    assert labels == [0, 0, 0, 2, 2, 2]
    with tarfile.open(shards / "shard-000002.tar") as tar:
        meta = json.loads(tar.extractfile("000002_000000.json").read())
    assert meta["label"] == 2 and meta["class_name"] == "triangle" and meta["cfg_scale"] == 2.0
    assert meta["prior_hash"] == sha256_file(Path(prior) / "model.safetensors") == manifest["prior_hash"]


# ---- (d) errors ----------------------------------------------------------------------------------------
def test_user_errors_are_clear(trained, pair, tmp_path, capsys):
    prior, tok = str(trained / "prior_run" / "prior"), str(trained / "tokenizer")

    def run(*args: str) -> tuple[int, str]:
        code = main(["augment", "--tokenizer", tok, "--per-class", "2", *args])
        return code, capsys.readouterr().err

    code, err = run("--prior", str(trained / "uncond_run" / "prior"), "--out", str(tmp_path / "a"))
    assert code == 2 and "unconditional" in err and "vqgan sample" in err
    code, err = run("--prior", prior, "--classes", "0,3", "--out", str(tmp_path / "b"))
    assert code == 2 and "class ids must lie in [0, 3)" in err and "[3]" in err
    code, err = run("--prior", prior, "--classes", "0,x", "--out", str(tmp_path / "b"))
    assert code == 2 and "--classes" in err

    out = tmp_path / "c"
    assert run("--prior", prior, "--classes", "1", "--out", str(out))[0] == 0
    code, err = run("--prior", prior, "--classes", "1", "--cfg", "3", "--out", str(out))
    assert code == 2 and "cfg_scale=2.0, now 3.0" in err and "another --out" in err
    code, err = run("--prior", prior, "--classes", "1", "--format", "wds", "--out", str(out))
    assert code == 2 and "format='folder', now 'wds'" in err

    other = _tokenizer()
    other.save_pretrained(tmp_path / "other_tok")
    code = main(["augment", "--prior", prior, "--tokenizer", str(tmp_path / "other_tok"), "--per-class", "2",
                 "--out", str(tmp_path / "d")])
    assert code == 2 and "trained on codes of tokenizer" in capsys.readouterr().err
    with pytest.raises(PriorLoadError):
        load_pair(prior, tmp_path / "other_tok")

    model, tokenizer = pair
    for bad, match in ((dict(per_class=0), "per_class"), (dict(per_class=1, classes=[1, 1]), "more than once"),
                       (dict(per_class=1, output_format="tar"), "output_format"),
                       (dict(per_class=1, top_p=1.5), "top_p")):
        with pytest.raises(AugmentError, match=match):
            augment(model, tokenizer, tmp_path / "e", progress=False, **bad)
