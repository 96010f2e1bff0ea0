"""The notebooks run top to bottom."""

import os

import nbformat
from nbclient import NotebookClient

from tests.helpers import REPO


def _execute(name, tmp_path):
  """Runs notebooks/NAME in a fresh kernel (which inherits os.environ) from tmp_path."""
  nb = nbformat.read(os.path.join(REPO, "notebooks", name), as_version=4)
  NotebookClient(nb, timeout=900, kernel_name="python3",
                 resources={"metadata": {"path": str(tmp_path)}}).execute()
  return nb


def outputs_and_text(nb):
  """The executed notebook's code-cell outputs, and all its printed (stream) text."""
  outputs = [o for c in nb.cells if c.cell_type == "code" for o in c.get("outputs", [])]
  text = "".join(o.get("text", "") for o in outputs if o.get("output_type") == "stream")
  return outputs, text


def test_quickstart(data_dir, tmp_path, monkeypatch):
  monkeypatch.setenv("TFDS_DATA_DIR", data_dir)
  monkeypatch.setenv("PYTHONPATH", REPO)
  nb = _execute("quickstart.ipynb", tmp_path)
  outputs, text = outputs_and_text(nb)
  assert "8 devices" in text
  acc = float(text.split("final test accuracy: ")[1].split()[0])
  assert acc > 0.9  # The mnist1d paper's CNN: 94%.
  assert any("image/png" in o.get("data", {}) for o in outputs)  # curves.png.
  # Progress is one line redrawn with "\r", not a line per update.
  progress = [l for l in text.split("\n") if "steps/s" in l]
  assert len(progress) == 1 and progress[0].count("\r[") >= 5, progress
  # The run lives in the named workdir beside the notebook, nowhere else.
  assert sorted(os.listdir(tmp_path)) == ["workdirs"]
  assert (tmp_path / "workdirs" / "quickstart" / "summary.json").exists()


def test_nnx_large_batch(data_dir, tmp_path, monkeypatch):
  """A user's own NNX model with effjax's sync BN and LARS trains on 8 simulated devices:
  the loss falls, the test accuracy is high, the loss and trust-ratio plot is drawn."""
  monkeypatch.setenv("TFDS_DATA_DIR", data_dir)
  monkeypatch.setenv("PYTHONPATH", REPO)
  nb = _execute("nnx_large_batch.ipynb", tmp_path)
  outputs, text = outputs_and_text(nb)
  assert "8 devices" in text
  first, last = (float(v) for v in text.split("train loss: first step ")[1].split(
      "\n")[0].split(", last step "))
  assert first > 2.0 and last < 0.05 * first, (first, last)
  assert float(text.split("test accuracy after 300 steps: ")[1].split()[0]) > 0.9
  assert any("image/png" in o.get("data", {}) for o in outputs)
