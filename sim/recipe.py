"""Rebuild a shipped model from the repository alone: a recipe file and one command.

What it is
    A recipe (TOML, e.g. `grasping/models/default.recipe.toml`) lists the rounds that produce a model.
    Each round collects seeded totes in the simulated cell (training catalogs only, never `test`) and
    trains on everything collected so far (earlier rounds' exports are replayed); a round may let the
    previous round's model choose a share of the executed candidates (on-policy labels: what that model
    was wrongly sure of). The last round's model is gated and written with its card; the card's
    reproducing command names the recipe and its sha256, so the file says how to make it again.

        pickcell train --recipe grasping/models/default.recipe.toml --out runs/default.safetensors
        pickcell train --recipe grasping/models/default.recipe.toml --out /tmp/m.safetensors --reduced

    `--reduced` runs the same steps at a toy size (`[reduced]` in the recipe: fewer totes per round,
    one epoch, no simulation suite); the test suite runs it so that the recipe cannot rot.

What is randomised
    Everything derives from the recipe's seeds: each round's collection seed and the training seed.
    A rebuild on another machine collects the same totes; training is repeatable up to floating-point
    reduction order (torch on CPU).

What counts as success
    The rebuilt model passes its gate (holdout + simulation suite) like any candidate; it is a new
    version (the recipe's `version`), never a silent replacement of the file it rebuilds.
"""

from __future__ import annotations

import hashlib
import logging
import sys
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - python < 3.11
    import tomli as tomllib

log = logging.getLogger(__name__)


class RecipeError(ValueError):
    """A recipe that cannot be run; the message names the file and the field."""


@dataclass(frozen=True)
class Round:
    episodes: int  # totes collected in this round
    seed: int  # the round's collection seed
    p_model_top: float = 0.0  # share of executed candidates the previous round's model chooses


@dataclass(frozen=True)
class Recipe:
    version: str  # the model version the rebuild writes
    rounds: tuple[Round, ...]
    objects_per_tote: int = 8  # items per tote
    watchdog_scenes: int = 60  # live scenes the watchdog's statistics are refit on
    sim_suite_episodes: int = 6  # the gate's simulation suite (episodes per planner)
    train: dict[str, Any] | None = None  # grasping.learning.TrainConfig fields (epochs, lr, seed, ...)
    reduced: dict[str, Any] | None = None  # overrides for --reduced
    text: str = ""  # the file's text, recorded with the model
    sha256: str = ""
    path: str = ""


_TOP = {"version", "rounds", "objects_per_tote", "watchdog_scenes", "sim_suite_episodes", "train", "reduced"}
_REDUCED = {"episodes", "objects_per_tote", "epochs", "watchdog_scenes", "sim_suite_episodes", "min_rows"}


def load_recipe(path: str | Path) -> Recipe:
    p = Path(path)
    try:
        text = p.read_text()
        raw = tomllib.loads(text)
    except OSError as exc:
        raise RecipeError(f"recipe {p}: cannot read it ({exc})") from None
    except tomllib.TOMLDecodeError as exc:
        raise RecipeError(f"recipe {p}: not valid TOML ({exc})") from None
    unknown = set(raw) - _TOP
    if unknown:
        raise RecipeError(f"recipe {p}: unknown keys {sorted(unknown)} (known: {sorted(_TOP)})")
    if not isinstance(raw.get("version"), str) or not raw["version"]:
        raise RecipeError(f"recipe {p}: `version` (a string) is required")
    rounds_raw = raw.get("rounds")
    if not isinstance(rounds_raw, list) or not rounds_raw:
        raise RecipeError(f"recipe {p}: at least one [[rounds]] table is required")
    rounds = []
    for i, r in enumerate(rounds_raw):
        try:
            rd = Round(int(r["episodes"]), int(r["seed"]), float(r.get("p_model_top", 0.0)))
        except (KeyError, TypeError, ValueError) as exc:
            raise RecipeError(
                f"recipe {p}: rounds[{i}] needs integer `episodes` and `seed` ({exc})"
            ) from None
        if rd.episodes < 1 or not 0.0 <= rd.p_model_top <= 1.0:
            raise RecipeError(f"recipe {p}: rounds[{i}]: episodes >= 1 and 0 <= p_model_top <= 1")
        if i == 0 and rd.p_model_top > 0:
            raise RecipeError(f"recipe {p}: rounds[0] has no previous model to choose candidates")
        rounds.append(rd)
    reduced = raw.get("reduced") or {}
    if set(reduced) - _REDUCED:
        raise RecipeError(f"recipe {p}: unknown [reduced] keys {sorted(set(reduced) - _REDUCED)}")
    from grasping.learning import TrainConfig

    train = raw.get("train") or {}
    bad = set(train) - set(TrainConfig.__dataclass_fields__)
    if bad:
        raise RecipeError(f"recipe {p}: unknown [train] keys {sorted(bad)}")
    return Recipe(
        version=raw["version"],
        rounds=tuple(rounds),
        objects_per_tote=int(raw.get("objects_per_tote", 8)),
        watchdog_scenes=int(raw.get("watchdog_scenes", 60)),
        sim_suite_episodes=int(raw.get("sim_suite_episodes", 6)),
        train=train,
        reduced=reduced,
        text=text,
        sha256=hashlib.sha256(text.encode()).hexdigest(),
        path=str(p),
    )


def reduce(recipe: Recipe) -> Recipe:
    """The same steps at the recipe's toy size (`[reduced]`)."""
    r = recipe.reduced or {}
    train = dict(recipe.train or {})
    if "epochs" in r:
        train["epochs"] = int(r["epochs"])
    if "min_rows" in r:
        train["min_rows"] = int(r["min_rows"])
    eps = r.get("episodes", [x.episodes for x in recipe.rounds])
    eps = [int(eps)] * len(recipe.rounds) if isinstance(eps, int) else [int(e) for e in eps]
    if len(eps) != len(recipe.rounds) or min(eps) < 1:
        raise RecipeError(f"recipe {recipe.path}: [reduced] episodes: one count >= 1 per round, got {eps}")
    return replace(
        recipe,
        version=recipe.version + "-reduced",
        rounds=tuple(replace(x, episodes=e) for x, e in zip(recipe.rounds, eps, strict=True)),
        objects_per_tote=int(r.get("objects_per_tote", recipe.objects_per_tote)),
        watchdog_scenes=int(r.get("watchdog_scenes", recipe.watchdog_scenes)),
        sim_suite_episodes=int(r.get("sim_suite_episodes", recipe.sim_suite_episodes)),
        train=train,
    )


def rebuild(
    recipe: Recipe,
    out_path: str | Path,
    work_dir: str | Path,
    *,
    workers: int = 2,
    registry: str | None = None,
    progress: bool = True,
) -> Any:
    """Run every round; returns the last round's sim.training.TrainFromSimResult (the model at out_path).

    Resumable: each round keeps its collection under work_dir/round-K, and a rerun with the same
    work_dir collects only the totes that are missing.
    """
    from grasping.learning import TrainConfig
    from sim.collect import ExplorationConfig
    from sim.training import TrainFromSimConfig, train_from_sim

    work = Path(work_dir)
    out = Path(out_path)
    exports: list[str] = []
    previous: Path | None = None
    res = None
    n = len(recipe.rounds)
    for k, rd in enumerate(recipe.rounds, start=1):
        last = k == n
        rdir = work / f"round-{k}"
        model = out if last else rdir / "model.safetensors"
        rdir.mkdir(parents=True, exist_ok=True)
        train = TrainConfig(
            **{
                **(recipe.train or {}),
                "model_version": recipe.version if last else f"{recipe.version}-round{k}",
                "progress": progress,
            }
        )
        cfg = TrainFromSimConfig(
            workers=workers,
            objects_per_tote=recipe.objects_per_tote,
            extra_data=tuple(exports),  # replay: everything the earlier rounds collected
            registry=registry if last else None,
            watchdog_scenes=recipe.watchdog_scenes,
            sim_suite_episodes=recipe.sim_suite_episodes if last else 0,
            gate=last,  # only the model that is shipped is gated
            progress=progress,
            train=train,
            exploration=ExplorationConfig(p_model_top=rd.p_model_top),
            explore_model=str(previous) if rd.p_model_top > 0 else None,
        )
        log.info("recipe %s: round %d of %d, %d totes (seed %d)", recipe.version, k, n, rd.episodes, rd.seed)
        res = train_from_sim(
            rd.episodes,
            model,
            rd.seed,
            work_dir=rdir,
            config=cfg,
            command=f"pickcell train --recipe {recipe.path} (round {k} of {n}; sha256 {recipe.sha256})",
        )
        exports.append(str(rdir / "data"))
        previous = model
    return res
