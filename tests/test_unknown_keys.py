"""A misspelt key fails at start-up with the nearest key, however it comes in: ``key=value``, ``+key=value``,
an experiment yaml, or anything else that ends up in the composed config."""
import os
import shutil
import subprocess
import sys

import pytest
from hydra import compose, initialize_config_dir

from conftest import REPO
from jambatrain.config import register_schema, to_train_config
from jambatrain.paths import CONF_DIR


def _compose(conf_dir, overrides):
    register_schema()
    with initialize_config_dir(config_dir=conf_dir, version_base="1.3"):
        return compose(config_name="train", overrides=overrides)


@pytest.mark.parametrize("override, hint", [
    ("+trainer.max_step=5", "trainer.max_step is not a config key: did you mean trainer.max_steps?"),
    ("++optim.max_steps=5", "optim.max_steps is not a config key: did you mean trainer.max_steps?"),
    ("+data.mqar.num_key=5", "data.mqar.num_key is not a config key: did you mean data.mqar.num_keys?"),
])
def test_an_added_key_the_schema_lacks_is_refused_after_composition(override, hint):
    """Hydra's struct mode lets ``+key`` add a key; the composed config is checked against the schema."""
    cfg = _compose(CONF_DIR, ["experiment=tiny_cpu", override])
    with pytest.raises(SystemExit, match=hint.replace("?", r"\?")):
        to_train_config(cfg)


def test_command_line_and_experiment_keys_are_checked_before_hydra(tmp_path):
    from jambatrain.config import override_key_problems

    conf = str(tmp_path / "conf")
    shutil.copytree(CONF_DIR, conf)
    with open(os.path.join(conf, "experiment", "typo.yaml"), "w") as f:
        f.write("# @package _global_\nname: typo\ntrainer:\n  max_step: 5\noptim:\n  lr: 1e-3\n")
    args = ["-m", "trainer.max_step=5", "modle=tiny", "model=tiny", "hydra/launcher=basic", "eval.tasks=[val]",
            "hydra.run.dir=x", "optim.lr=1e-3,2e-3", "+trainer.max_steps=4", "experiment=typo"]
    assert override_key_problems(args, conf) == [
        "trainer.max_step is not a config key: did you mean trainer.max_steps?",
        "modle is not a config key: did you mean model?",
        f"trainer.max_step is not a config key: did you mean trainer.max_steps? (in {conf}/experiment/typo.yaml)"]
    for name in os.listdir(os.path.join(CONF_DIR, "experiment")):  # the shipped presets are clean
        assert override_key_problems([f"experiment={name[:-5]}"], CONF_DIR) == []


def test_the_trainer_refuses_a_misspelt_key_in_seconds():
    env = {**os.environ, "PYTHONPATH": REPO}
    for override in ("trainer.max_step=5", "+trainer.max_step=5"):
        p = subprocess.run([sys.executable, "-m", "jambatrain.train", "experiment=tiny_cpu", override], cwd=REPO,
                           env=env, capture_output=True, text=True, timeout=120)
        assert p.returncode != 0
        assert "did you mean trainer.max_steps?" in p.stderr and "Traceback" not in p.stderr, p.stderr[-2000:]
