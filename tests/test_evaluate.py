"""Any model from one string (model_source) and its held-out numbers (evaluate): the
same numbers training reports, every token of a file counted once, global rounds
verified, and one clear line for a spec that names nothing."""
import json
import lzma
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from experiments.configs import lm
from tapestry_jax import coordinator as coord_lib
from tapestry_jax import evaluate
from tapestry_jax import federation
from tapestry_jax import loop
from tapestry_jax import model
from tapestry_jax import model_source
from tapestry_jax import site as site_lib
from tapestry_jax import trees
from tapestry_jax.model_source import ModelSourceError

import fed_fakes

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TEXT = ("Le système Debian.\n\nUne deuxième ligne, un peu plus longue — avec des accents.\n"
        "Et sa suite.\n\n\n  \nFin.\n")


@pytest.fixture(scope="module")
def run(tmp_path_factory):
  """A tiny run of 4 steps, checkpoints at 2 and 4, its final eval over the whole split."""
  c = lm.get_config("tiny")
  c.data.seq_len = 64
  c.data.synthetic.num_documents = 40
  c.train.update(dict(global_batch_size=8, steps=4, warmup_steps=1, log_every=2, eval_every=0,
                      eval_batches=0, checkpoint_every=2, keep_checkpoints=3,
                      progress_bar=False, peak_flops=1e11))
  workdir = str(tmp_path_factory.mktemp("evaluate") / "run")
  result = loop.train_and_evaluate(c, workdir)
  return workdir, result


@pytest.fixture()
def text_file(tmp_path):
  path = tmp_path / "fr.txt"
  path.write_text(TEXT, encoding="utf-8")
  return str(path)


def _same(a, b):
  jax.tree.map(lambda x, y: np.testing.assert_array_equal(np.asarray(x), np.asarray(y)), a, b)


def test_loads_a_workdir_its_checkpoint_steps_and_says_what_is_missing(run):
  workdir, result = run
  latest = model_source.load(workdir)
  assert latest.name == "run" and latest.data_cfg.seq_len == 64
  assert latest.model_cfg.d_model == lm.get_config("tiny").model.d_model
  _same(latest.params, result["state"].params)
  _same(model_source.load(os.path.join(workdir, "checkpoints")).params, latest.params)
  step2 = model_source.load(workdir + "@2")
  assert step2.name == "run@2"
  assert not np.array_equal(step2.params["embed"], latest.params["embed"])
  with pytest.raises(ModelSourceError, match=r"no checkpoint step 3 .*steps .*2, 4\)"):
    model_source.load(workdir + "@3")
  with pytest.raises(ModelSourceError, match="no such directory"):
    model_source.load(workdir + "_missing")
  empty = os.path.join(os.path.dirname(workdir), "empty")
  os.makedirs(empty)
  with open(os.path.join(empty, "config.json"), "w") as f:
    f.write(open(os.path.join(workdir, "config.json")).read())
  with pytest.raises(ModelSourceError, match="no checkpoint in"):
    model_source.load(empty)


def test_eval_on_the_runs_own_split_is_what_the_run_recorded(run):
  """The eval loss the run wrote to final_metrics.json, recomputed from the checkpoint;
  with another batch size (other packing) the same tokens give the same sums."""
  workdir, _ = run
  with open(os.path.join(workdir, "final_metrics.json")) as f:
    recorded = json.load(f)["eval"]
  loaded = model_source.load(workdir)
  data = evaluate.data_list(source="synthetic", split="eval")
  for batch_size in (8, 16):
    got = evaluate.evaluate(loaded, data, batch_size=batch_size)["results"]["synthetic:eval"]
    assert got["tokens"] == recorded["eval_tokens"]
    assert got["loss"] == pytest.approx(recorded["eval_loss"], rel=1e-6), batch_size
    assert got["bits_per_byte"] == pytest.approx(recorded["eval_bits_per_byte"], rel=1e-6)
    assert not got["truncated"]
  # The train split, too, is one ordered pass (not the training stream, which never ends).
  train = evaluate.evaluate(loaded, evaluate.data_list(source="synthetic", split="train"),
                            max_tokens=500)["results"]["synthetic:train"]
  assert train["tokens"] == 500 and train["truncated"]


def test_a_file_is_counted_whole_deterministically_or_up_to_max_tokens(run, text_file, tmp_path):
  workdir, _ = run
  loaded = model_source.load(workdir)
  xz = str(tmp_path / "fr.txt.xz")
  with lzma.open(xz, "wb") as f:
    f.write(TEXT.encode("utf-8"))
  data = evaluate.data_list([text_file, str(tmp_path / "*.xz")])
  assert [d.path for d in data] == [text_file, xz]
  out = evaluate.evaluate(loaded, data)
  plain, packed = out["results"][text_file], out["results"][xz]
  paragraphs = ["Le système Debian.", "Une deuxième ligne, un peu plus longue — avec des "
                "accents.\nEt sa suite.", "Fin."]
  nbytes = [len(p.encode("utf-8")) for p in paragraphs]
  # Byte tokens: every byte of every paragraph, plus its EOS, is a target once.
  assert plain["tokens"] == sum(nbytes) + len(paragraphs) and plain["bytes"] == sum(nbytes)
  assert packed == plain and not plain["truncated"]
  assert out["overall"]["tokens"] == 2 * plain["tokens"]
  assert out["overall"]["loss"] == pytest.approx(plain["loss"], rel=1e-12)
  assert plain["perplexity"] == pytest.approx(np.exp(plain["loss"]))
  assert evaluate.evaluate(loaded, data) == out  # deterministic

  cut = evaluate.evaluate(loaded, data[:1], max_tokens=40)["results"][text_file]
  assert cut["tokens"] == 40 and cut["truncated"] and cut["loss"] != plain["loss"]
  whole = evaluate.evaluate(loaded, data[:1], max_tokens=plain["tokens"])["results"][text_file]
  assert whole == plain
  table = evaluate.table([dict(evaluate.evaluate(loaded, data[:1], max_tokens=40))])
  assert "40*" in table and "truncated" in table


def test_a_global_round_is_read_verified_and_needs_a_config(tmp_path, text_file):
  cfg = fed_fakes.config()
  coord = fed_fakes.coordinator(cfg, tmp_path / "fed")
  coord.publish_initial()
  want, _ = coord_lib.initial_round(cfg)
  url = federation.bucket_urls(cfg, str(tmp_path / "fed"))[federation.GLOBAL]
  keys = cfg.federation.trust.public_keys
  got = model_source.load(url, config=cfg, public_key=keys.coordinator)
  assert got.name == "global@r0" and got.data_cfg.source == cfg.data.source
  flat = trees.flatten(got.params)
  assert flat.keys() == want.keys()
  for n, a in flat.items():
    np.testing.assert_array_equal(np.asarray(a), want[n], err_msg=n)
  assert model_source.load(url + "@0", config=cfg, name="base").name == "base"
  result = evaluate.evaluate(got, evaluate.data_list([text_file]))
  assert np.isfinite(result["overall"]["loss"])
  with pytest.raises(ModelSourceError, match="global round 0"):  # another party's key
    model_source.load(url, config=cfg, public_key=keys.latin)
  with pytest.raises(ModelSourceError, match="global round 3 is not committed"):
    model_source.load(url + "@3", config=cfg)
  with pytest.raises(ModelSourceError, match="pass --config"):
    model_source.load(url)


def test_a_federation_sites_workdir_loads_with_the_federation_config(tmp_path):
  """A site's checkpoint holds its train state next to its error-feedback residual."""
  cfg = fed_fakes.config(update_dtype="int8", error_feedback=True)
  site_dir = tmp_path / "fed" / "sites" / "latin"
  w = site_lib.SiteWorker(cfg, "latin", str(site_dir))
  w.train(1)
  w.save({"base_round": 0})
  w.close()
  with pytest.raises(ModelSourceError, match="pass --config"):
    model_source.load(str(site_dir))
  got = model_source.load(str(site_dir), config=cfg)
  assert got.name == "latin"
  assert got.data_cfg.synthetic.languages == "latin"
  _same(got.params, w.state.params)


def _cli(*args, cwd=ROOT):
  return subprocess.run([sys.executable, "-m", "launch.evaluate", *args], cwd=cwd,
                        capture_output=True, text=True, timeout=300)


def test_cli_compares_two_models_in_a_table_and_json(run, text_file, tmp_path):
  workdir, _ = run
  out = tmp_path / "eval.json"
  proc = _cli(f"--model={workdir}", f"--model={workdir}@2", f"--data={text_file}",
              "--source=synthetic", f"--json_out={out}")
  assert proc.returncode == 0, proc.stderr[-3000:]
  lines = proc.stdout.splitlines()
  assert "run" in lines[0] and "run@2" in lines[0]
  assert any(l.startswith(text_file) for l in lines)
  assert any(l.startswith("synthetic:eval") for l in lines)
  assert any(l.startswith("overall") for l in lines)
  saved = json.loads(out.read_text())
  assert [m["name"] for m in saved["models"]] == ["run", "run@2"]
  assert [d["name"] for d in saved["data"]] == [text_file, "synthetic:eval"]
  want = evaluate.evaluate(model_source.load(workdir), evaluate.data_list([text_file]))
  got = saved["models"][0]["results"][text_file]
  assert got["tokens"] == want["results"][text_file]["tokens"]
  assert got["loss"] == pytest.approx(want["results"][text_file]["loss"], rel=1e-5)
  later, earlier = (m["overall"]["loss"] for m in saved["models"])
  assert later < earlier  # 4 steps beat 2


def test_cli_bad_model_spec_is_one_line_and_status_2(run, text_file):
  workdir, _ = run
  proc = _cli(f"--model={workdir}@7", f"--data={text_file}")
  assert proc.returncode == 2, proc.stderr[-3000:]
  assert "Traceback" not in proc.stderr
  errors = [l for l in proc.stderr.splitlines() if l.startswith("error:")]
  assert len(errors) == 1 and "no checkpoint step 7" in errors[0], proc.stderr[-2000:]


def _sample(*args):
  return subprocess.run([sys.executable, "-m", "launch.sample", *args], cwd=ROOT,
                        capture_output=True, text=True, timeout=300)


def test_sample_cli_is_greedy_and_deterministic_at_temperature_0(run):
  workdir, _ = run
  args = (f"--model={workdir}", "--prompt=Lo", "--prompt=A longer prompt", "--max_new_tokens=12")
  first, again = _sample(*args), _sample(*args)
  assert first.returncode == 0, first.stderr[-3000:]
  assert first.stdout == again.stdout
  m = model_source.load(workdir)
  want = [np.concatenate([[m.tokenizer.bos_id], m.tokenizer.encode(p)]).astype(np.int32)
          for p in ("Lo", "A longer prompt")]
  # The reference: argmax of the whole forward over the prefix, token by token (one
  # compiled forward of a fixed length: causal, so what follows the prefix changes nothing).
  T = max(len(ids) for ids in want) + 12
  forward = jax.jit(lambda tokens: model.forward(m.params, tokens, jnp.arange(T)[None],
                                                 jnp.ones((1, T), jnp.int32), m.model_cfg))
  for prompt, ids in zip(("Lo", "A longer prompt"), want):
    seq = list(ids)
    for _ in range(12):
      L = len(seq)
      logits = forward(jnp.asarray([seq + [0] * (T - L)]))
      nxt = int(jnp.argmax(logits[0, L - 1]))
      seq.append(nxt)
      if nxt == m.tokenizer.eos_id:
        break
    text = prompt + m.tokenizer.decode(seq[len(ids):])
    assert text + "\n---" in first.stdout


def test_sample_cli_bad_model_is_one_line_and_status_2(tmp_path):
  proc = _sample(f"--model={tmp_path}/nothing")
  assert proc.returncode == 2 and "Traceback" not in proc.stderr
  assert len([l for l in proc.stderr.splitlines() if l.startswith("error:")]) == 1


def test_export_then_evaluate_and_sample_the_exported_directory(run, text_file, tmp_path):
  """launch.export writes the run as a Hugging Face directory; evaluating and sampling
  `hf:DIR` gives what the run itself gives (float32: the same params)."""
  workdir, _ = run
  out = tmp_path / "hf"
  proc = subprocess.run([sys.executable, "-m", "launch.export", f"--model={workdir}",
                         f"--out={out}"], cwd=ROOT, capture_output=True, text=True, timeout=300)
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert (out / "model.safetensors").exists() and (out / "config.json").exists()
  exported = model_source.load(f"hf:{out}")
  original = model_source.load(workdir)
  _same(exported.params, original.params)
  data = evaluate.data_list([text_file])
  # The same sequence length (an exported directory records none of the run's data).
  want = evaluate.evaluate(original, data, seq_len=64)["overall"]
  got = evaluate.evaluate(exported, data, seq_len=64)["overall"]
  assert got["tokens"] == want["tokens"]
  assert got["loss"] == pytest.approx(want["loss"], rel=1e-6)
  args = ("--prompt=Lo", "--max_new_tokens=8")
  a, b = _sample(f"--model={workdir}", *args), _sample(f"--model=hf:{out}", *args)
  assert a.returncode == 0 and b.returncode == 0, b.stderr[-3000:]
  assert a.stdout == b.stdout
