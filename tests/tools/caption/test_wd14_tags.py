"""WD14 tag vocabulary rewrites and tag selection (pure python)."""

from __future__ import annotations

import pytest

from sdtrain.errors import ConfigError, ModelLoadError
from sdtrain.tools.caption.tags import (
    TagSelection,
    TagVocabulary,
    append_tags,
    parse_replacements,
    prepare_names,
    read_selected_tags,
    select_tags,
    split_tag_list,
)

VOCAB = TagVocabulary(
    names=(
        "general",
        "sensitive",
        "questionable",
        "explicit",
        "1girl",
        "long_hair",
        "^_^",
        "hatsune_miku_(vocaloid)",
        "kagamine_rin",
        "smile",
    ),
    categories=("9", "9", "9", "9", "0", "0", "0", "4", "4", "0"),
)
#        general sens  quest expl 1girl long  ^_^   miku  rin   smile
PROBS = [0.2, 0.7, 0.05, 0.01, 0.9, 0.5, 0.1, 0.8, 0.6, 0.4]


def test_read_selected_tags(tmp_path):
    path = tmp_path / "selected_tags.csv"
    path.write_text("tag_id,name,category,count\n1,general,9,0\n2,1girl,0,5\n3,x_(y),4,1\n")
    vocab = read_selected_tags(path)
    assert vocab.names == ("general", "1girl", "x_(y)") and vocab.categories == ("9", "0", "4")
    path.write_text("id,tag,kind\n1,a,0\n")
    with pytest.raises(ModelLoadError, match="tag_id,name,category"):
        read_selected_tags(path)


def test_split_tag_list_uses_stripped_separator():
    assert split_tag_list(" 1girl,  solo ,,", ", ") == ["1girl", "solo"]
    assert split_tag_list("a | b", " | ") == ["a", "b"]
    assert split_tag_list(None, ", ") == []


def test_parse_replacements_with_escapes():
    assert parse_replacements("a,b; c\\,d , e\\;f ;") == [("a", "b"), ("c,d", "e;f")]
    assert parse_replacements(None) == []
    with pytest.raises(ConfigError) as info:
        parse_replacements("a,b,c")
    assert info.value.problems[0].key == "tag_replacement"


def test_prepare_names_underscore_expand_and_replacement():
    vocab = prepare_names(
        VOCAB,
        separator=", ",
        character_tag_expand=True,
        remove_underscore=True,
        replacements=[("long hair", "very long hair"), ("kagamine rin", "rin"), ("sensitive", "s")],
    )
    assert vocab.names == (
        "general",
        "s",
        "questionable",
        "explicit",
        "1girl",
        "very long hair",
        "^_^",
        "hatsune miku, vocaloid",
        "rin",
        "smile",
    )
    assert vocab.categories == VOCAB.categories


def test_prepare_names_keeps_short_underscored_tags():
    vocab = TagVocabulary(("^_^", "o_o", "a_b_c", "long_name"), ("0", "0", "0", "0"))
    assert prepare_names(vocab, separator=", ", remove_underscore=True).names == (
        "^_^",
        "o_o",
        "a b c",
        "long name",
    )


def test_thresholds_and_csv_order():
    chosen = select_tags(
        PROBS, VOCAB, TagSelection(general_threshold=0.45, character_threshold=0.7)
    )
    assert chosen == ["1girl", "long_hair", "hatsune_miku_(vocaloid)"]
    chosen = select_tags(
        PROBS, VOCAB, TagSelection(general_threshold=0.35, character_threshold=0.5)
    )
    assert chosen == ["1girl", "long_hair", "hatsune_miku_(vocaloid)", "kagamine_rin", "smile"]


def test_character_tags_first_keeps_their_order():
    selection = TagSelection(character_threshold=0.5, character_tags_first=True)
    assert select_tags(PROBS, VOCAB, selection) == [
        "hatsune_miku_(vocaloid)",
        "kagamine_rin",
        "1girl",
        "long_hair",
        "smile",
    ]


def test_rating_first_or_last_and_undesired():
    first = TagSelection(
        general_threshold=0.45,
        character_threshold=0.9,
        rating="first",
        undesired=frozenset({"long_hair"}),
    )
    assert select_tags(PROBS, VOCAB, first) == ["sensitive", "1girl"]
    last = TagSelection(general_threshold=0.45, character_threshold=0.9, rating="last")
    assert select_tags(PROBS, VOCAB, last) == ["1girl", "long_hair", "sensitive"]
    hidden = TagSelection(general_threshold=0.45, rating="last", undesired=frozenset({"sensitive"}))
    assert "sensitive" not in select_tags(PROBS, VOCAB, hidden)


def test_always_first_tags_in_listed_order():
    selection = TagSelection(character_threshold=0.5, always_first=("smile", "absent", "1girl"))
    assert select_tags(PROBS, VOCAB, selection) == [
        "smile",
        "1girl",
        "long_hair",
        "hatsune_miku_(vocaloid)",
        "kagamine_rin",
    ]


def test_duplicates_after_replacement_are_written_once():
    vocab = prepare_names(VOCAB, separator=", ", replacements=[("smile", "1girl")])
    assert select_tags(PROBS, vocab, TagSelection(character_threshold=0.99)) == [
        "1girl",
        "long_hair",
    ]


def test_score_count_must_match_the_tag_list():
    with pytest.raises(ModelLoadError, match="9 scores"):
        select_tags(PROBS[:-1], VOCAB, TagSelection())


def test_append_keeps_existing_first():
    assert append_tags("solo, 1girl\n", ["1girl", "smile"], ", ") == ["solo", "1girl", "smile"]
    assert append_tags("", ["a"], ", ") == ["a"]
