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


# --- classification, instances, Alpaca triples, Magpie requests ---------------------------------------------

from pipeline.generate.parse import (  # noqa: E402
    parse_alpaca_triples, parse_input_first, parse_is_classification, parse_magpie_query, parse_output_first)


def test_is_classification_reads_the_first_yes_or_no():
    assert parse_is_classification(" Yes") is True
    assert parse_is_classification(" no.") is False
    assert parse_is_classification(" **Yes**, it is") is True
    assert parse_is_classification(" Maybe") is None
    assert parse_is_classification(" Not really") is None  # 'No' must be a whole word


def test_input_first_with_input_and_without():
    assert parse_input_first(" The sky is blue.\nOutput: Positive statement about the sky.", False) == (
        "The sky is blue.", "Positive statement about the sky.")
    assert parse_input_first(" <noinput>\nOutput: Paris.", False) == ("", "Paris.")
    # A chat reply that repeats the field name, with prose before it and a second example after it.
    assert parse_input_first("Input: 3, 4\nOutput: 7\n\nTask: Add more numbers.\nInput: 1\nOutput: 1", False) == ("3, 4", "7")
    assert parse_input_first("Sure! Here is one.\nInput: 3, 4\nOutput: 7", False) == ("3, 4", "7")


def test_input_first_multiline_output_and_missing_output():
    assert parse_input_first(" <noinput>\nOutput: 1. Eggs\n2. Milk", False) == ("", "1. Eggs\n2. Milk")
    assert parse_input_first(" I am not sure what to write here.", False) is None
    assert parse_input_first(" <noinput>\nOutput:", False) is None


def test_input_first_truncated_inside_output_is_not_trusted():
    assert parse_input_first(" A long essay.\nOutput: The essay argues that", True) is None


def test_output_first_label_then_input():
    assert parse_output_first(" Negative\nInput: The food was cold and the waiter rude.", False) == (
        "The food was cold and the waiter rude.", "Negative")
    assert parse_output_first("Class label: Spam\nInput: WIN A FREE PHONE NOW", False) == ("WIN A FREE PHONE NOW", "Spam")
    assert parse_output_first(" Yes", False) == ("", "Yes")
    assert parse_output_first(" \n", False) is None


def test_alpaca_triples_with_noinput_extra_prose_and_cut_last_item():
    reply = (" Suggest a name for a bakery.\n4. Input:\n<noinput>\n4. Output:\nRise & Shine.\n###\n"
             "5. Instruction: Correct the grammar.\n5. Input:\nShe go to school.\n5. Output:\nShe goes to school.\n###\n"
             "Here are some more tasks!\n###\n7. Instruction: Summarize the plot of Hamlet.\n7. Input:")
    assert parse_alpaca_triples(reply, truncated=True) == [
        ("Suggest a name for a bakery.", "", "Rise & Shine."),
        ("Correct the grammar.", "She go to school.", "She goes to school.")]


def test_alpaca_triples_missing_input_field_still_parse_and_odd_numbering():
    reply = " Name a colour.\n4. Output:\nBlue.\n###\n9) Instruction: Add 2 and 3.\n9) Input: <noinput>\n9) Output: 5"
    assert parse_alpaca_triples(reply, truncated=False) == [("Name a colour.", "", "Blue."), ("Add 2 and 3.", "", "5")]


def test_magpie_query():
    assert parse_magpie_query("How do I sort a list in Python?", False) == "How do I sort a list in Python?"
    assert parse_magpie_query("   ", False) is None
    assert parse_magpie_query("Write a long story about", True) is None


# SmolLM2-135M-Instruct (llama.cpp, greedy) on prompts/instance_input_first.j2: a leading newline, a copied
# output, and a reply that loops until max_tokens (its first instance is complete, so it counts).
REAL_INSTANCE_COPY = "\n I can do anything.\nOutput: I can do anything.\n"
REAL_INSTANCE_LOOP = (" [new object name]\nOutput: [new object name]\n\nInput: [new object name]\nOutput: [new object name]"
                      "\n\nInput: [new object name]")


def test_input_first_on_real_replies():
    assert parse_input_first(REAL_INSTANCE_COPY, False) == ("I can do anything.", "I can do anything.")
    assert parse_input_first(REAL_INSTANCE_LOOP, True) == ("[new object name]", "[new object name]")


# SmolLM2-135M-Instruct on prompts/alpaca.j2 (completion, T=0.7): no '###' lines, no 'Input:' fields, one
# instruction repeated until the stop at '21.'.
REAL_ALPACA = (' Write the following sentence to the user: "I am a student of "CorporateBiology"".\n4. Output:\n'
               'Escritura Cognitiva\n5. Instruction: Write the following sentence to the user: "I am a student of '
               '"CorporateBiology".\n5. Output:\nEscritura Cognitiva\n6. Instruction: Write the following sentence')
# The same model on prompts/self_instruct_chat.j2: prose, then the list (it echoed the prompt's examples).
REAL_CHAT_LIST = ("In this task, you will be given a set of instructions to complete a task.\n\nHere are the 10 task "
                  "instructions with a variety of instructions and no images, audio, files, or browsing:\n\n1. Select the "
                  "oldest person from the list.\n2. Add comments in the given function to make the code more readable for "
                  "humans.\n3. Brainstorm a list of possible New Year's resolutions.\n4. As a newly hired sports coach, what "
                  "are your plans for the first 30 days on the job?\n7. Using the")
REAL_CHAT_NO_LIST = ("The language used for the instructions must be 1 to 2 sentences long.\n\nTask 1:\nThe language used "
                     "for the instructions should be diverse.\n\nPlease provide the instructions as a numbered list.")


def test_alpaca_triples_on_a_real_reply_without_separators_or_inputs():
    assert parse_alpaca_triples(REAL_ALPACA, truncated=True) == [
        ('Write the following sentence to the user: "I am a student of "CorporateBiology"".', "", "Escritura Cognitiva"),
        ('Write the following sentence to the user: "I am a student of "CorporateBiology".', "", "Escritura Cognitiva")]


def test_alpaca_block_header_on_the_separator_line():
    assert parse_alpaca_triples(" A.\n4. Output:\nB\n### 5. Instruction: C\n5. Input:\nD\n5. Output:\nE", False) == [
        ("A.", "", "B"), ("C", "D", "E")]


def test_chat_lists_on_real_replies():
    assert parse_numbered_list(REAL_CHAT_LIST, truncated=True) == [
        "Select the oldest person from the list.",
        "Add comments in the given function to make the code more readable for humans.",
        "Brainstorm a list of possible New Year's resolutions.",
        "As a newly hired sports coach, what are your plans for the first 30 days on the job?"]
    assert parse_numbered_list(REAL_CHAT_NO_LIST, truncated=False) == []  # 'Task 1:' with its text on the next line


# SmolLM2-135M-Instruct, greedy, on prompts/instance_output_first.j2 and instance_input_first.j2.
REAL_OUTPUT_FIRST = "\n not ethical\nInput: create a movie about the sea.\nOutput: no\n"
REAL_BULLETS_ONLY = " \n* \n* \n* \n* \n* "


def test_instances_on_more_real_replies():
    assert parse_output_first(REAL_OUTPUT_FIRST, False) == ("create a movie about the sea.", "not ethical")
    assert parse_input_first(REAL_BULLETS_ONLY, True) is None
    assert parse_input_first("\n I am not a vegan.\nOutput: No, you are not a vegan.\n", False) == (
        "I am not a vegan.", "No, you are not a vegan.")
