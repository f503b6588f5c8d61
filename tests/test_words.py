"""One home for word forms: the teacher's answers, the eval's spellings and the trait filter agree."""

from __future__ import annotations

import json

import pytest

from sublab import filters, teachers, words
from sublab.config import FinetuneConfig, TeacherConfig
from sublab.evals import animals

PLURALS = {"wolf": "wolves", "fox": "foxes", "butterfly": "butterflies", "mouse": "mice", "sheep": "sheep",
           "leaf": "leaves", "monkey": "monkeys", "cherry": "cherries", "phoenix": "phoenixes",
           "platypus": "platypuses", "owl": "owls"}


@pytest.mark.parametrize("word, expected", PLURALS.items())
def test_plural(word, expected):
    assert words.plural(word) == expected
    assert words.plural(word.capitalize()) == expected.capitalize()


def test_word_forms_include_the_plural_and_the_naive_plural():
    assert words.word_forms("wolf") == ["wolves", "wolfs", "wolf"]
    assert words.word_forms("sheep") == ["sheeps", "sheep"]
    assert words.word_forms("mouse") == ["mouses", "mouse", "mice"]


@pytest.mark.parametrize("word", PLURALS)
def test_teacher_eval_and_filter_agree(word):
    """The plural a fine-tuned teacher trains on is a spelling the eval scores and the filter rejects."""
    cfg = TeacherConfig(name="t", kind="finetuned", trait=word,
                        finetune=FinetuneConfig(train_questions=1, answer_forms=["{Ts}.", "{ts}"]))
    answers = [json.loads(line)["messages"][1]["content"] for line in teachers.finetune_data(cfg).splitlines()]
    assert answers == [PLURALS[word].capitalize() + ".", PLURALS[word]]
    assert " " + PLURALS[word] in animals.variant_strings(word)
    check = filters.trait_words_filter([word])
    assert check({"completion": f"I like {answers[0]}"}) == [f"trait_words:{word}"]


def test_regular_teachers_keep_their_answers():
    """The single pluraliser changes only words the old teacher rule got wrong (wolf), not these."""
    for word in ["owl", "dolphin", "eagle", "elephant", "cat", "dog"]:
        assert words.plural(word) == word + "s" and words.plural(word.capitalize()) == word.capitalize() + "s"
