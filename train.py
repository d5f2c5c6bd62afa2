"""Train a HOPE, Titans or Transformer language model.

    python train.py                                    # smoke HOPE on the offline default corpus
    python train.py model=titans train.steps=500 train.out_dir=runs/t
    torchrun --standalone --nproc_per_node=2 train.py model=transformer optim=mixed_muon_adamw
    python train.py experiment=plan_mid train.dry_run=true   # the plan: parameters, tokens, steps, memory
"""

import hydra
from omegaconf import DictConfig, OmegaConf

from nested_learning.train.config import register
from nested_learning.train.loop import run

register()  # the train section's schema and defaults (TrainConfig)


@hydra.main(config_path="configs", config_name="config", version_base="1.3")
def main(cfg: DictConfig) -> None:
    run(OmegaConf.to_container(cfg, resolve=True, throw_on_missing=True))  # prints its summary (rank 0)


if __name__ == "__main__":
    main()
