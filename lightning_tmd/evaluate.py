"""Evaluate generators on the shapes benchmark and write `metrics.json` and `table.md`.

    python -m lightning_tmd.evaluate models.teacher.ckpt=runs/shapes_teacher/main/checkpoints/last.ckpt

For every (model, sampler setting): generate one clip per held-out prompt with fixed seeds, then
FVD-shapes against the real clips of those prompts, prompt adherence and per-attribute accuracy by
the shapes judge, temporal consistency, effective NFE and latency. Generated sets are cached under the
checkpoint's content hash, so a reference (e.g. the 50-step teacher) is sampled once, even after its run
folder moves.

The cache lives in `cache_dir`, not in the output folder: a repeated evaluation reuses it wherever it writes.
An output folder that holds an earlier evaluation's metrics.json or table.md is refused, unless overwrite=true:
then those two are replaced (and nothing else in the folder is touched, e.g. the pipeline's suite/).
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import hydra
import torch
from omegaconf import DictConfig, OmegaConf

from lightning_tmd.app import CONFIG_DIR, check_earlier_outputs, log_lightning_into_run_log, remove_paths
from lightning_tmd.checks import check_device, check_positive
from lightning_tmd.data.shapes import clip_key, clip_settings
from lightning_tmd.generators import LoadedGenerator, load_generator
from lightning_tmd.metrics.benchmark import (
    generate_set,
    held_out_set,
    markdown_table,
    quality,
    table_notes,
    time_sampling,
)
from lightning_tmd.metrics.judge import (
    JudgeFeatures,
    ShapesJudgeNet,
    data_key,
    ensure_judge,
    judge_file_name,
    load_judge,
)
from lightning_tmd.metrics.video import (
    frechet_video_distance,
    shuffle_frames,
    update_in_batches,
)

OUTPUTS = ("metrics.json", "table.md")


def earlier_evaluation(folder: Path) -> list[Path]:
    """The outputs of an earlier evaluation in `folder`."""
    return [folder / name for name in OUTPUTS if (folder / name).exists()]


def data_settings(cfg: DictConfig, models: dict[str, LoadedGenerator]) -> dict[str, int]:
    """Clip settings of the evaluation: `cfg.data`, else the first model's; all models must agree."""
    if cfg.data is not None:
        data = clip_settings(dict(cfg.data))
    elif models:
        data = clip_settings(next(iter(models.values())).config["data"])
    else:
        raise ValueError("data: give the clip settings {frames, size, max_objects, seed} or at least one model")
    for name, loaded in models.items():
        clip = clip_key(loaded.config["data"])
        if clip != {k: v for k, v in data.items() if k != "seed"}:
            raise ValueError(f"models.{name}: trained on clips {clip}, the evaluation uses {data}")
    return data


def evaluation_judge(cfg: DictConfig, data: dict, cache_dir: Path) -> tuple[ShapesJudgeNet, dict, Path]:
    """The judge of `judge.path` as it is, else the cached judge of `judge.variant` and the judge's training
    settings for these clips (trained first when there is none)."""
    clips = (data["frames"], data["size"], data["max_objects"], data["speed"])
    if cfg.judge.path:
        return *load_judge(cfg.judge.path, data_key(*clips)), Path(cfg.judge.path)
    path = cache_dir / judge_file_name(data, cfg.judge.variant, {"steps": cfg.judge.steps,
                                                                 "batch_size": cfg.judge.batch_size})
    judge, info = ensure_judge(path, *clips, variant=cfg.judge.variant, steps=cfg.judge.steps,
                               batch_size=cfg.judge.batch_size)
    return judge, info, path


def optional_metrics(cfg: DictConfig, loaded: LoadedGenerator, captions: list[str], videos: torch.Tensor,
                     sampler: dict, cache_dir: Path) -> dict[str, float]:
    out = {}
    if cfg.clip_score.enabled:
        from lightning_tmd.metrics.clip_score import CLIPVideoScore

        scorer = CLIPVideoScore(cfg.clip_score.model, cfg.clip_score.weights, cfg.device)
        out["clip_score"] = scorer(videos, captions).mean().item()
    if cfg.lpips.enabled:
        from lightning_tmd.metrics.lpips_diversity import LPIPSDiversity

        prompts = captions[: cfg.lpips.prompts]
        pairs = [(p, int(s)) for p in prompts for s in cfg.lpips.seeds]
        clips, _ = generate_set(loaded, [p for p, _ in pairs], [s for _, s in pairs], sampler, cfg.batch_size,
                                cache_dir)
        out["lpips_diversity"] = LPIPSDiversity(cfg.lpips.weights)(clips, [p for p, _ in pairs])
    return out


def evaluate(cfg: DictConfig) -> list[dict[str, Any]]:
    """Run the evaluation; write metrics.json and table.md into `cfg.out_dir`; return the rows."""
    started = time.perf_counter()
    check_positive("num_samples", cfg.num_samples)
    if cfg.num_samples < 2:
        raise ValueError(f"num_samples={cfg.num_samples!r}: FVD-shapes needs at least 2 clips per set (256 for the "
                         "committed tables)")
    check_positive("batch_size", cfg.batch_size)
    check_device("device", cfg.device)
    out = Path(cfg.out_dir)
    check_earlier_outputs(out, earlier_evaluation(out), cfg.get("overwrite", False), "evaluations")
    cache_dir = Path(cfg.cache_dir)
    models = {name: load_generator(m.ckpt, cfg.device, ema=m.get("ema", True))
              for name, m in (cfg.models or {}).items()}
    data = data_settings(cfg, models)
    judge, judge_info, judge_path = evaluation_judge(cfg, data, cache_dir)
    variant = judge_info.get("training", {}).get("variant", "original")
    torch.manual_seed(cfg.seed)
    n = cfg.num_samples
    real = held_out_set(data, n, offset=cfg.seed * 4 * n)
    fvd = frechet_video_distance(JudgeFeatures(judge))
    update_in_batches(fvd, real["videos"], real=True)
    seeds = [cfg.seed * n + i for i in range(n)]

    rows: list[dict[str, Any]] = []
    if cfg.references:
        other = held_out_set(data, n, offset=cfg.seed * 4 * n + n)
        shuffled = shuffle_frames(other["videos"], torch.Generator().manual_seed(cfg.seed))
        rows.append({"model": "real", "setting": "real vs real", **quality(judge, fvd, other["videos"],
                                                                              other["labels"])})
        rows.append({"model": "real", "setting": "real vs shuffled frames",
                     **quality(judge, fvd, shuffled, other["labels"])})
    for name, loaded in models.items():
        for setting, overrides in cfg.models[name].settings.items():
            sampler = OmegaConf.to_container(overrides, resolve=True) or {}
            videos, nfe = generate_set(loaded, real["captions"], seeds, sampler, cfg.batch_size, cache_dir)
            row = {"model": name, "setting": setting, "nfe": nfe, **quality(judge, fvd, videos, real["labels"]),
                   **optional_metrics(cfg, loaded, real["captions"], videos, sampler, cache_dir),
                   **time_sampling(loaded, sampler, cfg.latency.batch_size, cfg.latency.repeats)}
            rows.append(row)
            print({k: round(v, 4) if isinstance(v, float) else v for k, v in row.items() if k != "shape_confusion"})

    out.mkdir(parents=True, exist_ok=True)
    remove_paths(earlier_evaluation(out))  # overwrite=true
    judge_acc = judge_info.get("accuracy", {})
    result = {"rows": rows, "num_samples": n, "seed": cfg.seed, "data": data, "judge": {
        "path": str(judge_path), "variant": variant, "held_out_accuracy": judge_acc,
        "held_out_accuracy_random_areas": judge_info.get("accuracy_random_areas")},
        "latency_batch_size": cfg.latency.batch_size,
        "wall_time_s": time.perf_counter() - started, "threads": torch.get_num_threads()}
    (out / "metrics.json").write_text(json.dumps(result, indent=2))
    notes = table_notes(n, cfg.seed, judge.num_features, variant, judge_acc, cfg.latency.repeats,
                        cfg.latency.batch_size, result["wall_time_s"])
    table = markdown_table(rows, notes)
    (out / "table.md").write_text(table)
    print(table)
    return rows


@hydra.main(version_base="1.3", config_path=CONFIG_DIR, config_name="evaluate")
def main(cfg: DictConfig) -> None:
    log_lightning_into_run_log()  # the judge's training, when it is trained here
    evaluate(cfg)


if __name__ == "__main__":
    main()
