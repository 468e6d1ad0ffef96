import ddpo_rl  # noqa: F401

import pytest

from ddpo_rl.prompt_sets import (
    indefinite_article,
    list_prompt_sets,
    load_prompt_set,
    noun_activity_prompts,
)


def test_simple_animals():
    animals = load_prompt_set("simple_animals")
    assert len(animals) == 45 == len(set(animals))
    assert animals[:3] == ["cat", "dog", "horse"] and animals[-1] == "kangaroo"
    assert all(a == a.strip().lower() and a for a in animals)


def test_imagenet_animals_are_classes_0_to_397():
    classes = load_prompt_set("imagenet_animals")
    assert len(classes) == 398
    assert classes[0] == "tench, Tinca tinca"
    assert classes[151] == "Chihuahua"
    assert classes[291].startswith("lion")
    assert classes[397].startswith("puffer")
    dogs = load_prompt_set("imagenet_dogs")
    assert len(dogs) == 118 and dogs[0] == "Chihuahua" and dogs[-1] == "Mexican hairless"


def test_animal_activities():
    activities = load_prompt_set("activities")
    assert activities == ["washing dishes", "playing chess", "riding a bike"]
    prompts = load_prompt_set("animal_activities")
    assert len(prompts) == 45 * 3 == len(set(prompts))
    assert prompts[:3] == ["a cat washing dishes", "a cat playing chess", "a cat riding a bike"]
    assert "an ant riding a bike" in prompts and "a ant riding a bike" not in prompts
    assert load_prompt_set("animal_activities") == prompts  # deterministic


def test_articles_and_generators():
    assert indefinite_article("ant") == "an" and indefinite_article("cat") == "a"
    assert indefinite_article("Elephant") == "an"
    assert noun_activity_prompts(["owl", "dog"], ["sleeping"]) == ["an owl sleeping", "a dog sleeping"]


def test_files_and_unknown_names(tmp_path):
    path = tmp_path / "mine.txt"
    path.write_text("a red cube\n\n  a blue sphere \n")
    assert load_prompt_set(str(path)) == ["a red cube", "a blue sphere"]
    with pytest.raises(KeyError, match="simple_animals"):
        load_prompt_set("no_such_set")
    assert {"simple_animals", "imagenet_animals", "animal_activities"} <= set(list_prompt_sets())
