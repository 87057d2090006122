"""Caption pipeline (§5.1, §5.5, §14), caption files and tag counts (§3.3)."""

from __future__ import annotations

import itertools
import random
from dataclasses import replace

import pytest

from sdtrain.data.captions import (
    CaptionRecipe,
    process_caption,
    read_caption_file,
    tag_frequency,
    token_warmup_steps,
)
from sdtrain.errors import DataError


def run(caption: str, recipe: CaptionRecipe, seed: int = 0, epoch: int = 1, step: int = 0) -> str:
    return process_caption(caption, recipe, random.Random(seed), epoch, step)


def test_plain_caption_passes_through_unchanged():
    assert run("a photo, of sks dog", CaptionRecipe()) == "a photo, of sks dog"
    assert run("first line\nsecond line", CaptionRecipe()) == "first line"


def test_keep_tokens_separator_fixes_head_and_tail_while_shuffling():
    recipe = CaptionRecipe(shuffle_caption=True, keep_tokens_separator="|||")
    seen = set()
    for seed in range(60):
        out = run("a, b ||| c, d, e ||| f", recipe, seed)
        tags = out.split(", ")
        assert tags[:2] == ["a", "b"] and tags[-1] == "f"
        assert sorted(tags[2:5]) == ["c", "d", "e"]
        seen.add(tuple(tags[2:5]))
    assert seen == set(itertools.permutations("cde"))


def test_keep_tokens_separator_is_removed_without_shuffle():
    # reference [quirk] fixed: the marker no longer reaches the tokenizer
    recipe = CaptionRecipe(keep_tokens_separator="|||")
    assert run("a, b ||| c, d, e ||| f", recipe) == "a, b, c, d, e, f"
    assert run("a, b ||| c", recipe) == "a, b, c"


def test_keep_tokens_counts_leading_tags():
    recipe = CaptionRecipe(shuffle_caption=True, keep_tokens=2)
    outs = {run("sks, dog, x, y, z", recipe, seed) for seed in range(40)}
    assert all(o.startswith("sks, dog, ") for o in outs)
    assert len(outs) == 6


def test_keep_tokens_is_ignored_when_the_separator_is_present():
    recipe = CaptionRecipe(shuffle_caption=True, keep_tokens=3, keep_tokens_separator="|||")
    outs = {run("a ||| b, c, d", recipe, seed) for seed in range(40)}
    assert all(o.startswith("a, ") for o in outs)
    assert len(outs) == 6


def test_secondary_separator_groups_tags_then_becomes_the_separator():
    recipe = CaptionRecipe(shuffle_caption=True, secondary_separator=";;;")
    outs = {run("x;;;y, z", recipe, seed) for seed in range(30)}
    assert outs == {"x,y, z", "z, x,y"}
    assert run("sky;;;cloud, day", replace(recipe, shuffle_caption=False)) == "sky,cloud, day"


def test_empty_tags_are_dropped_when_rearranging():
    recipe = CaptionRecipe(shuffle_caption=True)
    outs = {run("a, , b,", recipe, seed) for seed in range(20)}
    assert outs == {"a, b", "b, a"}


def test_custom_separator_is_kept_on_rejoin():
    recipe = CaptionRecipe(shuffle_caption=True, caption_separator=";")
    outs = {run("a;b;c", recipe, seed) for seed in range(40)}
    assert all(sorted(o.split("; ")) == ["a", "b", "c"] for o in outs)
    assert len(outs) == 6


def test_dropout_every_n_epochs_uses_one_based_epochs():
    recipe = CaptionRecipe(caption_dropout_every_n_epochs=2)
    assert [run("cap", recipe, epoch=e) for e in range(1, 5)] == ["cap", "", "cap", ""]
    every = CaptionRecipe(caption_dropout_every_n_epochs=1)
    assert all(run("cap", every, epoch=e) == "" for e in range(1, 4))


def test_dropout_rate_is_random_but_seeded():
    recipe = CaptionRecipe(caption_dropout_rate=0.3, caption_suffix="s")
    drops = [run("cap", recipe, seed) == "" for seed in range(1000)]
    assert 0.25 < sum(drops) / 1000 < 0.35
    assert run("cap", CaptionRecipe(caption_dropout_rate=1.0)) == ""


def test_dropped_caption_skips_replacements():
    recipe = CaptionRecipe(caption_dropout_rate=1.0, replacements=[("", "template")])
    assert run("cap", recipe) == ""


def test_tag_dropout_only_touches_flexible_tags():
    recipe = CaptionRecipe(caption_tag_dropout_rate=1.0, keep_tokens=1)
    assert run("sks, a, b, c", recipe) == "sks"
    half = CaptionRecipe(caption_tag_dropout_rate=0.5)
    kept = [len(run("a, b, c, d", half, seed).split(", ")) for seed in range(400)]
    assert 1.7 < sum(kept) / 400 < 2.3


def test_wildcards_choose_alternatives_and_keep_escaped_braces():
    recipe = CaptionRecipe(enable_wildcard=True)
    outs = {run("a {red|blue|green} {{literal}} cat", recipe, seed) for seed in range(40)}
    assert outs == {f"a {c} {{literal}} cat" for c in ("red", "blue", "green")}
    assert run("keep {{this}} and }} {{", recipe) == "keep {this} and } {"


def test_wildcard_picks_one_line_and_prefix_applies_to_it():
    recipe = CaptionRecipe(enable_wildcard=True, caption_prefix="pre", caption_suffix="suf")
    outs = {run("one\ntwo\nthree", recipe, seed) for seed in range(40)}
    assert outs == {"pre one suf", "pre two suf", "pre three suf"}


def test_prefix_and_suffix_take_part_in_shuffling():
    assert run("cap", CaptionRecipe(caption_prefix="pre", caption_suffix="suf")) == "pre cap suf"
    recipe = CaptionRecipe(shuffle_caption=True, caption_prefix="sks,", caption_suffix=", end")
    outs = {run("a, b", recipe, seed) for seed in range(200)}
    assert all(sorted(o.split(", ")) == ["a", "b", "end", "sks"] for o in outs)
    assert len(outs) == 24


def test_token_warmup_truncates_the_flexible_tags():
    recipe = CaptionRecipe(keep_tokens=1, token_warmup_min=1, token_warmup_step=10)
    caption = "sks, " + ", ".join(f"t{i}" for i in range(9))  # 9 flexible tags
    assert run(caption, recipe, step=0) == "sks, t0"
    assert run(caption, recipe, step=5) == "sks, t0, t1, t2, t3, t4"  # floor(5*8/10)+1
    assert run(caption, recipe, step=10) == caption
    assert run(caption, recipe, step=99) == caption


def test_token_warmup_steps_resolves_fractions_without_mutating():
    recipe = CaptionRecipe(token_warmup_step=0.25)
    assert token_warmup_steps(recipe, 1000) == 250
    assert token_warmup_steps(recipe, 3) == 0
    assert recipe.token_warmup_step == 0.25
    assert token_warmup_steps(CaptionRecipe(token_warmup_step=40), 1000) == 40
    assert token_warmup_steps(CaptionRecipe(), 1000) == 0
    with pytest.raises(ValueError, match="token_warmup_steps"):
        run("a, b", recipe)
    with pytest.raises(ValueError):
        token_warmup_steps(CaptionRecipe(token_warmup_step=-1), 10)


def test_replacements():
    recipe = CaptionRecipe(replacements=[("sks", "sks1 sks2"), ("dog", "cat")])
    assert run("a sks dog", recipe) == "a sks1 sks2 cat"
    templates = CaptionRecipe(replacements=[("", ["a photo of X", "a picture of X"])])
    outs = {run("ignored", templates, seed) for seed in range(20)}
    assert outs == {"a photo of X", "a picture of X"}
    with pytest.raises(ValueError):
        run("a", CaptionRecipe(replacements=[("a", ["b"])]))


def test_same_seed_same_caption_and_global_random_untouched():
    recipe = CaptionRecipe(
        shuffle_caption=True,
        enable_wildcard=True,
        caption_tag_dropout_rate=0.2,
        caption_dropout_rate=0.1,
    )
    caption = "a, {b|c}, d, e, f, g\nh, i, j"
    random.seed(123)
    expected_global = random.random()
    random.seed(123)
    outs = [run(caption, recipe, seed) for seed in range(50)]
    assert random.random() == expected_global
    assert outs == [run(caption, recipe, seed) for seed in range(50)]
    assert len(set(outs)) > 30


def write(path, data: bytes | str):
    if isinstance(data, str):
        data = data.encode("utf-8")
    path.write_bytes(data)
    return path


def test_read_caption_file_first_line_or_all_lines(tmp_path):
    image = write(tmp_path / "img.png", b"")
    write(tmp_path / "img.caption", "  first, line  \n\n second \n")
    assert read_caption_file(image, ".caption", False) == "first, line"
    assert read_caption_file(image, ".caption", True) == "first, line\nsecond"
    assert read_caption_file(image, ".txt", False) is None


def test_read_caption_file_extension_without_dot_and_crlf(tmp_path):
    image = write(tmp_path / "img.jpg", b"")
    write(tmp_path / "img.txt", b"\xef\xbb\xbfone\r\ntwo\r\n")  # BOM + CRLF
    assert read_caption_file(image, "txt", False) == "one"
    assert read_caption_file(image, "txt", True) == "one\ntwo"


def test_read_caption_file_face_crop_name_fallback(tmp_path):
    face = write(tmp_path / "dog_10_20_30_40.png", b"")
    write(tmp_path / "dog.caption", "a dog")
    assert read_caption_file(face, ".caption", False) == "a dog"
    write(tmp_path / "dog_10_20_30_40.caption", "own caption")
    assert read_caption_file(face, ".caption", False) == "own caption"


def test_read_caption_file_ignores_underscores_in_folders(tmp_path):
    folder = tmp_path / "1_a_b_c"
    folder.mkdir()
    write(tmp_path / "1.caption", "wrong")
    write(tmp_path / "1_a_b.caption", "wrong too")
    assert read_caption_file(write(folder / "img_x.png", b""), ".caption", False) is None


def test_read_caption_file_rejects_non_utf8(tmp_path):
    image = write(tmp_path / "img.png", b"")
    bad = write(tmp_path / "img.caption", "café".encode("latin-1"))
    with pytest.raises(DataError) as info:
        read_caption_file(image, ".caption", False)
    assert str(bad) in info.value.message and "UTF-8" in info.value.message
    assert "UTF-8" in info.value.hint


def test_read_caption_file_gives_an_empty_caption_for_an_empty_file(tmp_path):
    """As the reference: the image trains with an empty caption (the plan warns with a count)."""
    image = write(tmp_path / "img.png", b"")
    write(tmp_path / "img.caption", b"")
    assert read_caption_file(image, ".caption", False) == ""


def test_tag_frequency():
    assert tag_frequency(["A, b", "a,  ,c", ""]) == {"a": 2, "b": 1, "c": 1}
