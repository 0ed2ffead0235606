"""The task section: the reward, the prompts and how images are sampled for them (every trainer)."""

from __future__ import annotations

import dataclasses
import re
from typing import Optional

from diffrl.config._base import APPLY, Checks, ConfigBase, option
from diffrl.config.resume import OBJECTIVE, SHAPES

__all__ = ["TaskSection", "split_prompts"]


def split_prompts(text: Optional[str]) -> list[str]:
    """Split a comma-separated prompt list; ``\\,`` is a literal comma, blanks are dropped."""
    if not text:
        return []
    parts = re.split(r"(?<!\\),", text)
    return [p.replace("\\,", ",").strip() for p in parts if p.strip()]


@dataclasses.dataclass
class TaskSection(ConfigBase):
    """What is rewarded, for which prompts, and the sampler that makes the images."""

    sample_num_steps: int = option(50, resume=SHAPES, help="Number of sampler inference steps.")
    sample_eta: float = option(1.0, resume=APPLY,
                               help="Eta parameter for the DDIM sampler (0: deterministic, 1: DDPM-like).")
    sample_guidance_scale: float = option(5.0, resume=APPLY, help="Classifier-free guidance weight.")
    negative_prompts: str = option("", resume=APPLY,
                                   help="Comma-separated list of prompts to use as negative examples (write \\, for "
                                        "a comma inside a prompt).")

    # ---- diffrl extras ----
    reward: Optional[str] = option(None, trl=False, resume=OBJECTIVE,
                                   help="The reward: a registered name (aesthetic, pickscore, ...), an installed "
                                        "package's (entry point group diffrl.rewards), or your own as "
                                        "package.module:function (TRL's reward signature, or a factory/class "
                                        "taking reward_options). null: the model's default (the digit classifier "
                                        "for the digits DDPM).")
    reward_options: dict = option(factory=dict, trl=False, resume=OBJECTIVE,
                                  help="Keyword arguments for the reward (reward_options.KEY=VALUE on the command "
                                       "line). Credentials (token, api_key, password, URL user-info) are never "
                                       "written to files or trackers; give them as '${env:NAME}' to read the "
                                       "environment variable NAME instead.")
    prompts: Optional[str] = option(None, trl=False, resume=OBJECTIVE,
                                    help="The prompt source: a registered name (simple_animals, from_file, ...), an "
                                         "installed package's (group diffrl.prompts), or your own as "
                                         "package.module:function (a prompt function without parameters, or a "
                                         "factory taking prompt_options). null: the model's default (an empty "
                                         "prompt for an unconditional model).")
    prompt_options: dict = option(factory=dict, trl=False, resume=OBJECTIVE,
                                  help="Keyword arguments for the prompt source.")

    @property
    def negative_prompt_list(self) -> list[str]:
        """``negative_prompts`` split at commas (TRL documented the commas but never split them)."""
        return split_prompts(self.negative_prompts)

    def _check(self, c: Checks, num_processes: int, check_environment: bool) -> None:
        super()._check(c, num_processes, check_environment)
        c.at_least("sample_num_steps", 1)
        c.between("sample_eta", 0.0, 1.0, fix="set sample_eta in [0, 1]: DDIM's sigma_t needs eta <= 1 "
                                              "(Song et al. 2021, eq. 16)")
        for name in ("reward", "prompts"):
            if c.ok(name) and getattr(self, name) == "":
                c.add(name, "must not be empty", f"set {name} to a name, or null for the default")
