"""The toy world: grammar, train/eval split, deterministic rendering, flawed corpus."""
from __future__ import annotations

import numpy as np
import pytest

from diffusion_kto.toy import world


def test_every_prompt_parses_back_to_its_spec():
    for spec in world.all_specs():
        assert world.parse(spec.prompt) == spec


def test_grammar_shape_and_explicit_default_background():
    assert len(world.all_prompts()) == len(world.COLOURS) * len(world.SHAPES) * len(world.BACKGROUNDS)
    assert world.parse("a red circle") == world.parse("A red circle on white") == world.Spec("red", "circle")
    assert world.Spec("blue", "square", "black").prompt == "a blue square on black"


@pytest.mark.parametrize("bad", ["a purple circle", "a red hexagon", "a red circle on plaid", "red", ""])
def test_parse_rejects_prompts_outside_the_grammar(bad):
    with pytest.raises(ValueError, match="toy grammar"):
        world.parse(bad)


def test_split_is_disjoint_complete_and_covers_every_word():
    train, held = world.train_prompts(), world.eval_prompts()
    assert set(train).isdisjoint(held)
    assert sorted(train + held) == sorted(world.all_prompts())
    assert 0 < len(held) < len(train)
    train_words = {w for p in train for w in p.split()}
    assert set(world.COLOURS) | set(world.SHAPES) | {"black", "gray"} <= train_words
    assert world.train_prompts() == train and world.eval_prompts() == held  # deterministic


def test_vocabulary_covers_every_prompt():
    vocab = set(world.vocabulary())
    assert all(set(p.split()) <= vocab for p in world.all_prompts())


def test_render_is_deterministic_32x32_rgb():
    a = world.render("a green triangle on gray", ("blur",), rng=7)
    b = world.render(world.Spec("green", "triangle", "gray"), ["blur"], rng=np.random.default_rng(7))
    assert a.size == (32, 32) and a.mode == "RGB"
    assert np.array_equal(np.asarray(a), np.asarray(b))
    assert not np.array_equal(np.asarray(a), np.asarray(world.render("a green triangle on gray", ("blur",), rng=8)))


def test_render_rejects_unknown_flaws():
    with pytest.raises(ValueError, match="unknown flaws"):
        world.render("a red circle", ("sparkles",))


def test_clean_render_has_prompted_background_and_centred_shape():
    pixels = np.asarray(world.render("a blue square on black", rng=0)).astype(int)
    assert (pixels[0, 0] == 0).all() and (pixels[-1, -1] == 0).all()
    centre = pixels[16, 16]
    assert centre[2] > 150 and centre[0] < 100  # blue


def test_corpus_is_deterministic_with_the_requested_flaw_share():
    images, prompts = world.make_corpus(400, seed=3, flaw_rate=0.4)
    again, prompts_again = world.make_corpus(400, seed=3, flaw_rate=0.4)
    assert prompts == prompts_again and len(images) == 400
    assert all(np.array_equal(np.asarray(x), np.asarray(y)) for x, y in zip(images[:20], again[:20]))
    assert set(prompts) <= set(world.train_prompts())
    flaws = world.sample_flaws(4000, np.random.default_rng(0), 0.4)
    share = np.mean([bool(f) for f in flaws])
    assert 0.36 < share < 0.44
    assert {f[0] for f in flaws if f} == set(world.FLAWS)
