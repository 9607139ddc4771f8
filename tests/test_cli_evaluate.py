"""``mttlite evaluate`` and ``mttlite baselines`` as a user runs them: any set in, one results.json out.

Tiny protocols (width 8, 2 epochs, 1 network) on the embedded fashion-mnist-mini keep each run to
seconds. The commands run in-process through ``cli.main`` (the exit code and stderr are what a shell
sees); one refusal also runs as ``python -m mttlite``. Also the swap protocols (``mttlite.swaps``)."""
from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from mttlite import cli
from mttlite.data import load_dataset
from mttlite.evaluate import EvalProtocol, random_real_subset
from mttlite.swaps import default_augmentations, swap_protocols, swaps_markdown
from mttlite.synset import SyntheticSet

TINY = ["--width", "8", "--epochs", "2", "--num-nets", "1"]


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def ds():
    return load_dataset("fashion-mnist-mini")


@pytest.fixture
def synset_file(tmp_path, ds) -> Path:
    x, y = random_real_subset(ds, 1, seed=2)
    s = SyntheticSet(images=x, labels=y, syn_lr=0.02, dataset=ds.name, class_names=ds.class_names, mean=ds.mean,
                     std=ds.std, arch="convnet", arch_kwargs={"width": 16}, method="mtt")
    return s.save(tmp_path / "run" / "synset.safetensors")


@pytest.fixture
def authors_run(tmp_path, ds) -> Path:
    x, y = random_real_subset(ds, 1, seed=3)
    run = tmp_path / "logged_files" / "run"
    run.mkdir(parents=True)
    torch.save(x, run / "images_1000.pt")
    torch.save(y, run / "labels_1000.pt")
    torch.save(torch.tensor(0.03), run / "lr_1000.pt")
    return run


def tree(path: Path) -> dict:
    return {str(p.relative_to(path)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(Path(path).rglob("*")) if p.is_file()}


def fails(capsys, argv, *fragments) -> str:
    """The command exits with 2 and one ``mttlite …: error:`` line holding every fragment, no traceback."""
    assert cli.main(argv) == 2
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.startswith("mttlite ")]
    assert len(lines) == 1 and "Traceback" not in err, err
    for f in fragments:
        assert f in lines[0], (f, lines[0])
    return lines[0]


# --- mttlite sets --------------------------------------------------------------------------------


def test_evaluate_writes_results_beside_the_set(capsys, synset_file):
    assert cli.main(["evaluate", str(synset_file), *TINY, "--val-per-class", "5", "--random-real"]) == 0
    out = capsys.readouterr().out
    assert "final test acc" in out and "random real:" in out and "val" in out
    results = synset_file.parent / "results.json"
    doc = json.loads(results.read_text())
    assert doc["format"] == "mttlite-evaluation/1" and "final-epoch" in doc["accuracy"]
    assert doc["protocol"] == EvalProtocol(width=8, epochs=2, num_nets=1).to_dict()  # --width beats the set's 16
    assert len(doc["result"]["accs"]) == 1 and len(doc["result"]["val_accs"]) == 1
    assert 0.0 <= doc["result"]["accs"][0] <= 1.0
    assert doc["dataset"]["val"] == 50 and doc["dataset"]["val_spec"] == {"per_class": 5, "seed": 0}
    assert doc["dataset"]["train"] == 6000 - 50
    assert doc["set"]["format"] == "mttlite" and doc["set"]["syn_lr"] == 0.02 and doc["set"]["ipc"] == 1
    assert doc["random_real"]["set_info"]["source"] == "random real subset" and doc["random_real"]["lr"] == 0.01
    assert doc["result"]["lr"] == 0.02  # the set's learned α
    assert [p.name for p in results.parent.iterdir() if p.name.startswith(".")] == []  # no temporary file left


def test_protocol_file_and_flags(capsys, synset_file, tmp_path):
    proto = tmp_path / "protocol.json"
    proto.write_text(json.dumps({"epochs": 2, "num_nets": 2, "width": 8, "dsa_strategy": "", "batch_size": 5}))
    out = tmp_path / "res" / "r.json"
    assert cli.main(["evaluate", str(synset_file), "--protocol", str(proto), "--num-nets", "1", "--batch", "4",
                     "--out", str(out)]) == 0
    doc = json.loads(out.read_text())
    p = doc["protocol"]
    assert (p["epochs"], p["num_nets"], p["width"], p["dsa_strategy"], p["batch_size"]) == (2, 1, 8, "", 4)
    assert not (synset_file.parent / "results.json").exists()  # --out, not beside the set
    assert cli.main(["evaluate", str(synset_file), *TINY, "--dsa-strategy", "none", "--out", str(tmp_path)]) == 0
    assert json.loads((tmp_path / "results.json").read_text())["protocol"]["dsa_strategy"] == ""


def test_bad_settings_fail_before_work(capsys, synset_file, tmp_path):
    proto, broken = tmp_path / "p.json", tmp_path / "broken.json"
    proto.write_text(json.dumps({"epochs": 2, "nets": 1}))
    broken.write_text("{not json")
    before = tree(tmp_path)
    fails(capsys, ["evaluate", str(synset_file), "--protocol", str(proto)], "unknown field(s) ['nets']", "num_nets")
    fails(capsys, ["evaluate", str(synset_file), "--protocol", str(broken)], "not valid JSON")
    fails(capsys, ["evaluate", str(synset_file), *TINY, "--scores", "--full-acc", "85"], "--full-acc", "not a percentage")
    fails(capsys, ["evaluate", str(synset_file), *TINY, "--space", "zca"], "drop --space")
    fails(capsys, ["evaluate", str(synset_file), *TINY, "--dsa-strategy", "crop_blur"], "blur")
    fails(capsys, ["evaluate", str(synset_file), *TINY, "--swaps", "--swap-archs", "transformer"], "transformer")
    fails(capsys, ["evaluate", str(synset_file), *TINY, "--swap-epochs", "3"], "need --swaps")
    fails(capsys, ["evaluate", str(synset_file), *TINY, "--swaps", "--swap-epochs", "3,many"], "--swap-epochs", "100,1000")
    fails(capsys, ["evaluate", str(synset_file), *TINY, "--full-acc", "0.8"], "add --scores")
    fails(capsys, ["evaluate", str(tmp_path / "none.safetensors")], "none.safetensors")
    assert tree(tmp_path) == before


# --- imported sets, swaps and scores ---------------------------------------------------------------


def test_authors_set_with_swaps_and_scores(capsys, authors_run):
    argv = ["evaluate", str(authors_run), "--dataset", "fashion-mnist-mini", "--space", "normalised", *TINY,
            "--swaps", "--swap-archs", "mlp", "--scores", "--full-acc", "0.85"]
    assert cli.main(argv) == 0
    out = capsys.readouterr().out
    assert "| swap | network |" in out and "LRS" in out and "ARS" in out
    doc = json.loads((authors_run / "results.json").read_text())
    s = doc["set"]
    assert (s["format"], s["space"], s["method"], s["syn_lr"], s["n"]) == ("authors", "normalised", "mtt", pytest.approx(0.03), 10)
    assert str(authors_run / "images_1000.pt") in s["provenance"]["files"]
    rows = doc["swaps"]
    assert [(r["factor"], r["value"]) for r in rows] == [("base", "as declared"), ("augmentation", "none"),
                                                         ("augmentation", "crop"), ("augmentation", "flip"),
                                                         ("arch", "mlp")]
    assert rows[0]["mean"] == doc["result"]["mean"]  # the base row is the declared protocol: same seeds, same number
    assert rows[1]["augmentation"] == "none" and rows[2]["augmentation"] == "crop" and rows[4]["arch"] == "mlp"
    sc = doc["scores"]
    assert sc["accuracies"]["real_hard"] == 0.85 and sc["runs"]["real_hard"] == {"given": 0.85}
    assert sc["hlr"] == pytest.approx(0.85 - doc["result"]["mean"])
    assert 0.0 <= sc["lrs"] <= 1.0 and 0.0 <= sc["ars"] <= 1.0


def test_imported_sets_refuse_without_space_or_dataset(capsys, authors_run, tmp_path):
    before = tree(tmp_path)
    fails(capsys, ["evaluate", str(authors_run), "--dataset", "fashion-mnist-mini", *TINY],
          "images_1000.pt", "--space normalised", "--space zca")
    fails(capsys, ["evaluate", str(authors_run), "--space", "normalised", *TINY], "--dataset NAME")
    fails(capsys, ["evaluate", str(authors_run), "--dataset", "cifar10", "--space", "normalised", *TINY,
                   "--data-root", str(tmp_path / "nodata")], "CIFAR-10")
    assert tree(tmp_path) == before
    torch.save(torch.zeros(10, 3, 32, 32), authors_run / "images_1000.pt")  # a CIFAR-sized set
    before = tree(tmp_path)
    fails(capsys, ["evaluate", str(authors_run), "--dataset", "fashion-mnist-mini", "--space", "normalised", *TINY],
          "3x32x32", "1x28x28")
    assert tree(tmp_path) == before
    # as a shell sees it
    r = subprocess.run([sys.executable, "-m", "mttlite", "evaluate", str(authors_run), "--dataset", "fashion-mnist-mini"],
                       capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"}, timeout=120)
    assert r.returncode == 2 and "Traceback" not in r.stderr and "--space normalised" in r.stderr


def test_folder_and_tensor_sets(capsys, ds, tmp_path):
    x, y = random_real_subset(ds, 1, seed=4)
    s = SyntheticSet(images=x, labels=y, syn_lr=None, dataset=ds.name, class_names=ds.class_names, mean=ds.mean,
                     std=ds.std, method="random")
    s.export_imagefolder(tmp_path / "pngs")
    assert cli.main(["evaluate", str(tmp_path / "pngs"), "--dataset", "fashion-mnist-mini", *TINY]) == 0
    doc = json.loads((tmp_path / "pngs" / "results.json").read_text())
    assert (doc["set"]["format"], doc["set"]["space"], doc["result"]["lr"]) == ("folder", "pixels", 0.01)
    from safetensors.torch import save_file

    save_file({"images": x, "labels": y, "syn_lr": torch.tensor(0.04)}, str(tmp_path / "t.safetensors"))
    assert cli.main(["evaluate", str(tmp_path / "t.safetensors"), "--dataset", "fashion-mnist-mini",
                     "--space", "normalised", *TINY, "--out", str(tmp_path / "t.json")]) == 0
    doc = json.loads((tmp_path / "t.json").read_text())
    assert (doc["set"]["format"], doc["result"]["lr"]) == ("tensor", pytest.approx(0.04))


# --- mttlite baselines ---------------------------------------------------------------------------


def test_baselines_command_builds_and_saves(capsys, tmp_path):
    out = tmp_path / "sets" / "random1.safetensors"
    assert cli.main(["baselines", "random", "--ipc", "1", "--seed", "3", "--val-per-class", "5", "--out", str(out)]) == 0
    s = SyntheticSet.load(out)
    assert (s.method, s.ipc, s.config["seed"], s.syn_lr) == ("random", 1, 3, None)
    assert s.provenance["val_split"] == {"per_class": 5, "seed": 0}
    assert cli.main(["evaluate", str(out), *TINY]) == 0
    assert json.loads((out.parent / "results.json").read_text())["set"]["method"] == "random"
    assert cli.main(["baselines", "list"]) == 0
    assert "dm: iterations=200" in capsys.readouterr().out
    before = tree(tmp_path)
    fails(capsys, ["baselines", "random", "--ipc", "1", "--opt", "iterations=5", "--out", str(tmp_path / "x.safetensors")],
          "no option(s) ['iterations']")
    fails(capsys, ["baselines", "nosuch", "--ipc", "1", "--out", str(tmp_path / "x.safetensors")], "unknown method")
    fails(capsys, ["baselines", "random", "--ipc", "1", "--out", str(tmp_path / "x.pt")], ".safetensors")
    fails(capsys, ["baselines", "random", "--out", str(tmp_path / "x.safetensors")], "--ipc")
    assert tree(tmp_path) == before


def test_baseline_options_are_parsed(tmp_path):
    from mttlite.commands import parse_option

    assert parse_option("iterations=20") == ("iterations", 20)
    assert parse_option("lr_img=0.5") == ("lr_img", 0.5)
    assert parse_option("dsa_strategy=none") == ("dsa_strategy", None)
    assert parse_option("progress=false") == ("progress", False)
    assert parse_option("buffer=buffers/x") == ("buffer", "buffers/x")
    with pytest.raises(ValueError, match="KEY=VALUE"):
        parse_option("iterations")


# --- swap protocols -------------------------------------------------------------------------------


def test_swap_protocols_change_one_factor_at_a_time():
    base = EvalProtocol(width=8, epochs=2, num_nets=1, dsa_strategy="")
    swaps = swap_protocols(base, "fashion-mnist", archs=["convnet", "mlp"], epochs=[2, 5])
    assert [(s.factor, s.value) for s in swaps] == [("base", "as declared"), ("augmentation", "dsa"),
                                                    ("augmentation", "crop"), ("augmentation", "flip"),
                                                    ("arch", "mlp"), ("epochs", "5")]  # duplicates of base dropped
    assert swaps[1].protocol.dsa_strategy is None and swaps[4].protocol.width == 8 and swaps[5].protocol.epochs == 5
    assert default_augmentations("mnist") == ("none", "dsa", "crop")  # no flip for digits
    with pytest.raises(ValueError, match="blur"):
        swap_protocols(base, "fashion-mnist", augmentations=["blur"])
    rows = [{"factor": "base", "value": "as declared", "arch": "convnet", "augmentation": "none", "epochs": 2,
             "lr": 0.01, "mean": 0.5, "std": 0.01, "accs": [0.49, 0.51], "val_mean": None}]
    table = swaps_markdown(rows)
    assert table.splitlines()[2] == "| base | ConvNet | none | 2 | 0.01 | 50.00 ± 1.00 (2 nets) |"
