from pipeline.generate.parse import parse_completion_tasks, parse_numbered_list

# Replies taken from SmolLM2-135M-Instruct (llama.cpp, T=0.7) on the few-shot "Task 9:" prompt.
REAL_STOPPED = (" Explain how the police can be used to solve the crime.\nTask 10: Provide a story of a person who is a "
                "hero.\nTask 11: Provide a story about a person who is a hero.\n\nPlease write the answers.")
REAL_DRIFT = (" Walk for 8 hours.\nTask 10: Read a book and play video games.\nOutput: [1, 2, 3, 4, 5, 6, 7, 8, 9, 10, "
              "11, 12, 13, 14, 15")
REAL_TRUNCATED = (" Create a recipe for a vegan dinner.\nTask 10: Determine if the following sentence is a lie.\n"
                  "Task 11: Determine the highest rated person based on")


def test_completion_continuation_splits_tasks_and_stops_at_blank_line():
    assert parse_completion_tasks(REAL_STOPPED, 9, truncated=False) == [
        "Explain how the police can be used to solve the crime.",
        "Provide a story of a person who is a hero.",
        "Provide a story about a person who is a hero."]


def test_completion_stops_at_prose_drift():
    assert parse_completion_tasks(REAL_DRIFT, 9, truncated=True) == ["Walk for 8 hours.", "Read a book and play video games."]


def test_truncated_last_task_is_dropped():
    assert parse_completion_tasks(REAL_TRUNCATED, 9, truncated=True) == [
        "Create a recipe for a vegan dinner.", "Determine if the following sentence is a lie."]


def test_odd_numbering_and_prose_in_chat_lists():
    reply = "Sure! Here are some tasks:\n9. Name three rivers.\n10) Write a haiku about tea.\n- Explain DNS.\nThanks!"
    assert parse_numbered_list(reply, truncated=False) == ["Name three rivers.", "Write a haiku about tea.", "Explain DNS."]


def test_chat_list_truncated_item_dropped():
    assert parse_numbered_list("1. Name a fruit.\n2. Describe the", truncated=True) == ["Name a fruit."]
