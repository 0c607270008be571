"""checkpoint.load_checkpoint on files that are not checkpoints: one full line that says what the
file is and what was expected, never a fragment of torch's message cut mid-word.

The run folder is a real one: train.py for one epoch of a tiny network on a tiny phantom.
"""

from __future__ import annotations

import os
import re

import pytest
import torch

from pelvicseg import phantom
import predict
import train
from pelvicseg.checkpoint import CheckpointError, load_checkpoint
from pelvicseg.cli import run_cli

EXPECTED = "best.pt or last.pt written by train.py, or its run folder"


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    base = tmp_path_factory.mktemp("checkpoint_run")
    phantom.write_phantom(base / "data", patients=5, weeks=1, shape=(20, 18, 12), seed=0)
    out = base / "run"
    code = run_cli(train.main, train.get_args(["--data-root", str(base / "data"), "--out", str(out), "--epochs", "1",
                                               "--spatial-size", "16", "16", "16", "--channels", "4", "8", "8", "8",
                                               "--workers", "0", "--device", "cpu"]))
    assert code == 0 and (out / "config.json").is_file() and (out / "best.pt").is_file()
    return out


def assert_full_line(message: str, path) -> None:
    assert "\n" not in message, message
    assert str(path) in message
    assert message.count("(") == message.count(")") and message.count("`") % 2 == 0, message
    assert message.rstrip().endswith(("folder", ")")), message


def test_a_runs_config_json_is_named_as_json_with_its_checkpoint_beside_it(run_dir):
    path = run_dir / "config.json"
    with pytest.raises(CheckpointError) as caught:
        load_checkpoint(path)
    message = str(caught.value)
    assert_full_line(message, path)
    assert "a JSON file, not a checkpoint" in message and EXPECTED in message
    assert str(run_dir / "best.pt") in message  # what to give instead


def test_predict_given_config_json_ends_in_that_one_line(run_dir, tmp_path, capsys):
    image = next((run_dir.parent / "data" / "semantic_MRs_anon").glob("*.nii.gz"))
    code = run_cli(predict.main, predict.get_args(["--checkpoint", str(run_dir / "config.json"), "--input", str(image),
                                                   "--out", str(tmp_path / "out"), "--device", "cpu"]))
    assert code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: ") and "a JSON file, not a checkpoint" in err[0], err
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("content, kind", [(b"epochs 40\nlr 3e-3\n", "a text file"),
                                           (b"", "an empty file"),
                                           (b'{"spacing": [3.4, 3.4, 3.1]}', "a JSON file")])
def test_other_files_say_what_they_are(tmp_path, content, kind):
    path = tmp_path / "notes.pt"
    path.write_bytes(content)
    with pytest.raises(CheckpointError) as caught:
        load_checkpoint(path)
    message = str(caught.value)
    assert_full_line(message, path)
    assert f"{kind}, not a checkpoint" in message and EXPECTED in message


def test_a_folder_and_a_missing_file_say_what_is_expected(tmp_path):
    for path, what in ((tmp_path, "a folder"), (tmp_path / "best.pt", "does not exist")):
        with pytest.raises(CheckpointError) as caught:
            load_checkpoint(path)
        assert_full_line(str(caught.value), path)
        assert what in str(caught.value) and EXPECTED in str(caught.value)


class Payload:
    def __reduce__(self):
        return os.system, ("true",)


def test_refused_pickle_keeps_whole_words_of_torchs_reason(tmp_path):
    path = tmp_path / "evil.pt"
    torch.save({"model": Payload(), "model_args": {}}, path)
    with pytest.raises(Exception) as original:
        torch.load(path, weights_only=True)
    with pytest.raises(CheckpointError) as caught:
        load_checkpoint(path)
    message = str(caught.value)
    assert_full_line(message, path)
    assert "refused" in message
    reason = message[message.index("(") + 1:message.rindex(")")].removesuffix(" ...")
    words = set(str(original.value).split())
    assert reason and all(word in words for word in reason.split()), reason
    assert re.search(r"GLOBAL \S*system", reason), reason  # the part of torch's text that says why
