"""The 2-D utility experiment runs end to end on a tiny recipe and moves SFT towards the liked mean."""
import json

from diffusion_kto.toy.points2d import Recipe2D, run


def test_tiny_recipe_runs_and_writes_outputs(tmp_path):
    recipe = Recipe2D(pretrain_steps=150, finetune_steps=60, samples=300, timesteps=20, batch_size=128)
    results = run(tmp_path, recipe)
    assert (tmp_path / "utility2d.png").is_file()
    saved = json.loads((tmp_path / "utility2d.json").read_text())
    assert set(saved) >= {"pretrained", "kt", "loss_averse", "risk_seeking", "sft"}
    assert results["sft"]["dist_to_liked"] < results["pretrained"]["dist_to_liked"]
