from typing import Any

from hypothesis import given
from hypothesis import strategies as st

from middleware import extract
from middleware.extract import Collector, _chat, _chat_of_strings
from middleware.protocols import UserInput


def test_chat_string_content_of_user_messages_only() -> None:
    body = {
        "model": "gpt-4o",
        "messages": [
            {"role": "system", "content": "system words"},
            {"role": "developer", "content": "developer words"},
            {"role": "user", "content": "first question"},
            {"role": "assistant", "content": "assistant words"},
            {"role": "tool", "content": "tool words", "tool_call_id": "x"},
            {"role": "user", "content": "second question"},
        ],
    }
    assert extract.chat(body) == UserInput(texts=("first question", "second question"))


def test_chat_text_and_image_parts() -> None:
    body = {
        "messages": [
            {
                "role": "user",
                "content": [
                    {"type": "text", "text": "what is this?"},
                    {"type": "image_url", "image_url": {"url": "https://example.com/a.png", "detail": "low"}},
                    {"type": "image_url", "image_url": "data:image/png;base64,AAAA"},
                    {"type": "input_audio", "input_audio": {"data": "AAAA", "format": "wav"}},
                ],
            },
            {"role": "assistant", "content": [{"type": "text", "text": "assistant part"}]},
        ]
    }
    found = extract.chat(body)
    assert found.texts == ("what is this?",)
    assert found.images == ("https://example.com/a.png", "data:image/png;base64,AAAA")
    assert found.unjudgeable == ("messages[0].content[3]",)  # the audio


def test_identical_texts_and_images_are_deduplicated_in_order() -> None:
    body = {
        "messages": [
            {"role": "user", "content": "b"},
            {"role": "user", "content": "a"},
            {"role": "user", "content": [{"type": "text", "text": "b"}, {"type": "image_url", "image_url": "u"}]},
            {"role": "user", "content": [{"type": "image_url", "image_url": {"url": "u"}}]},
        ]
    }
    assert extract.chat(body) == UserInput(texts=("b", "a"), images=("u",))


def test_blank_texts_are_not_input() -> None:
    body = {"messages": [{"role": "user", "content": "  \n"}, {"role": "user", "content": ""}]}
    assert not extract.chat(body)


def test_completion_prompt_string_list_and_token_ids() -> None:
    assert extract.completions({"prompt": "once upon"}).texts == ("once upon",)
    assert extract.completions({"prompt": ["one", "two", 3]}).texts == ("one", "two")
    assert not extract.completions({"prompt": [1, 2, 3]})
    assert not extract.completions({"prompt": [[1, 2], [3]]})


def test_responses_string_input() -> None:
    assert extract.responses({"input": "hello", "instructions": "be nice"}).texts == ("hello",)


def test_responses_items_of_the_user_only() -> None:
    body = {
        "instructions": "system-ish words",
        "input": [
            {"role": "system", "content": "system words"},
            {"role": "developer", "content": [{"type": "input_text", "text": "developer words"}]},
            {"role": "user", "content": "plain user text"},
            {
                "type": "message",
                "role": "user",
                "content": [
                    {"type": "input_text", "text": "part text"},
                    {"type": "input_image", "image_url": "https://example.com/b.png", "detail": "auto"},
                    {"type": "input_image", "file_id": "file-123"},
                ],
            },
            {"type": "message", "role": "assistant", "content": [{"type": "output_text", "text": "model words"}]},
            {"type": "function_call_output", "call_id": "c", "output": "tool words"},
            {"type": "message", "content": [{"type": "input_text", "text": "roleless message"}]},
        ],
    }
    found = extract.responses(body)
    assert found.texts == ("plain user text", "part text", "roleless message")
    assert found.images == ("https://example.com/b.png",)
    assert found.unjudgeable == ("input[3].content[2]",)  # the image by file id


def test_wrong_types_are_skipped() -> None:
    odd: list[dict[str, Any]] = [
        {"messages": "not a list"},
        {"messages": [None, 1, "x", [], {"role": "user"}, {"role": "user", "content": 5}]},
        {"messages": [{"role": "user", "content": [None, 1, {"type": "text", "text": 7}, {"type": "image_url"}]}]},
        {"messages": [{"role": ["user"], "content": "x"}]},
    ]
    for body in odd:
        assert not extract.chat(body)
    assert not extract.completions({"prompt": {"a": 1}})
    assert not extract.responses({"input": [{"role": "user", "content": {"text": "x"}}, None, 3]})
    assert not extract.chat([])


json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(),
    lambda children: st.lists(children, max_size=5) | st.dictionaries(st.text(max_size=10), children, max_size=5),
    max_leaves=30,
)
# keys the extractor looks at, so generated values land where it reads
shaped_keys = st.sampled_from(["messages", "prompt", "input", "role", "content", "type", "text", "image_url", "url"])
shaped_values = st.recursive(
    st.none() | st.integers() | st.text(max_size=8) | st.sampled_from(["user", "text", "input_text", "image_url"]),
    lambda children: st.lists(children, max_size=4) | st.dictionaries(shaped_keys, children, max_size=4),
    max_leaves=40,
)


@given(st.sampled_from([extract.chat, extract.completions, extract.responses]), json_values | shaped_values)
def test_never_raises_on_any_json_value(extractor: extract.Extractor, value: Any) -> None:
    for body in (value, {"messages": value, "prompt": value, "input": value}):
        found = extractor(body)
        assert all(isinstance(text, str) for text in found.texts)
        assert all(isinstance(url, str) for url in found.images)


user_texts = st.text(min_size=1, max_size=30).filter(lambda text: bool(text.strip()))
other_roles = st.sampled_from(["system", "developer", "assistant", "tool"])


@given(
    st.lists(
        st.tuples(st.sampled_from(["user", "other"]), user_texts, st.booleans(), other_roles),
        max_size=12,
    )
)
def test_finds_every_user_text_of_a_chat_body(messages: list[tuple[str, str, bool, str]]) -> None:
    body_messages: list[dict[str, Any]] = []
    expected: list[str] = []
    for kind, text, as_parts, role in messages:
        content: Any = [{"type": "text", "text": text}] if as_parts else text
        if kind == "user":
            body_messages.append({"role": "user", "content": content})
            expected.append(text)
        else:
            body_messages.append({"role": role, "content": content})
    found = extract.chat({"model": "m", "messages": body_messages})
    assert found.texts == tuple(dict.fromkeys(expected))
    assert not found.images


@given(
    st.lists(
        st.tuples(
            st.sampled_from(["string", "user-message", "user-item", "roleless-message", "bare-part", "other"]),
            user_texts,
            st.booleans(),
            st.sampled_from(["system", "developer", "assistant"]),
        ),
        max_size=12,
    )
)
def test_finds_every_user_text_of_a_responses_body(items: list[tuple[str, str, bool, str]]) -> None:
    body_items: list[Any] = []
    expected: list[str] = []
    for kind, text, as_parts, role in items:
        content: Any = [{"type": "input_text", "text": text}] if as_parts else text
        if kind == "string":
            body_items.append(text)
        elif kind == "user-message":
            body_items.append({"role": "user", "content": content})
        elif kind == "user-item":
            body_items.append({"type": "message", "role": "user", "content": content})
        elif kind == "roleless-message":
            body_items.append({"type": "message", "content": content})
        elif kind == "bare-part":
            body_items.append({"type": "input_text", "text": text})
        else:
            body_items.append({"type": "message", "role": role, "content": content})
            body_items.append({"type": "function_call_output", "call_id": "c", "output": text})
            continue
        expected.append(text)
    found = extract.responses({"model": "m", "instructions": "app words", "input": body_items})
    assert found.texts == tuple(dict.fromkeys(expected))


@given(st.one_of(user_texts, st.lists(st.one_of(user_texts, st.integers()), max_size=8)))
def test_finds_every_text_of_a_completion_prompt(prompt: str | list[str | int]) -> None:
    found = extract.completions({"model": "m", "prompt": prompt})
    texts = [prompt] if isinstance(prompt, str) else [item for item in prompt if isinstance(item, str)]
    assert found.texts == tuple(dict.fromkeys(texts))


@given(st.lists(st.tuples(user_texts, st.sampled_from(["text", "image"])), min_size=1, max_size=8), user_texts)
def test_a_user_text_hidden_among_other_parts_is_found(parts: list[tuple[str, str]], hidden: str) -> None:
    content: list[Any] = [
        {"type": "text", "text": value} if kind == "text" else {"type": "image_url", "image_url": {"url": value}}
        for value, kind in parts
    ]
    content.insert(len(content) // 2, {"type": "text", "text": hidden})
    messages = [{"role": "system", "content": "s"}, {"role": "user", "content": content}]
    assert hidden in extract.chat({"messages": messages}).texts


_json = st.recursive(
    st.none() | st.booleans() | st.integers() | st.text(max_size=5),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=5), inner, max_size=3),
    max_leaves=8,
)
_message = st.one_of(
    st.fixed_dictionaries({"role": st.sampled_from(["user", "system", "assistant"]), "content": st.text(max_size=8)}),
    st.fixed_dictionaries({"role": st.sampled_from(["user", "tool"]), "content": _json}),
    _json,
)


@given(st.lists(_message, max_size=6))
def test_the_common_chat_path_agrees_with_the_general_one(messages: list[Any]) -> None:
    common = _chat_of_strings(messages)
    general = Collector()
    _chat(general, messages)
    if common is not None:
        assert common == general.result()
    else:  # only a user message whose content is not a string sends a chat to the general path
        assert any(
            isinstance(m, dict) and m.get("role") == "user" and not isinstance(m.get("content"), str) for m in messages
        )


# --- the parts no detector reads ---------------------------------------------------------------


def test_chat_names_audio_files_and_images_without_a_url() -> None:
    body = {
        "messages": [
            {"role": "system", "content": [{"type": "file", "file": {"file_id": "file-sys"}}]},
            {"role": "user", "content": "hello"},
            {
                "role": "user",
                "content": [
                    {"type": "input_audio", "input_audio": {"data": "AAAA", "format": "wav"}},
                    {"type": "file", "file": {"file_data": "JVBERi0=", "filename": "a.pdf"}},
                    {"type": "image_url", "image_url": {"detail": "low"}},
                    {"type": "input_video", "video": "new part types are unreadable until taught"},
                    {"type": "text", "text": "with parts"},
                ],
            },
        ]
    }
    found = extract.chat(body)
    assert found.texts == ("hello", "with parts")
    assert found.unjudgeable == (
        "messages[2].content[0]",
        "messages[2].content[1]",
        "messages[2].content[2]",
        "messages[2].content[3]",
    )


def test_a_part_without_a_type_is_judged_for_its_text() -> None:
    found = extract.chat({"messages": [{"role": "user", "content": [{"text": "untyped words"}, {"other": 1}]}]})
    assert found == UserInput(texts=("untyped words",))


def test_completion_suffix_is_judged_and_token_ids_are_unreadable() -> None:
    assert extract.completions({"prompt": "def f(", "suffix": "return x"}).texts == ("def f(", "return x")
    assert extract.completions({"prompt": [1, 2, 3]}) == UserInput(unjudgeable=("prompt",))
    found = extract.completions({"prompt": ["text", [1, 2], [3]], "suffix": 5})
    assert found == UserInput(texts=("text",), unjudgeable=("prompt[1]", "prompt[2]"))
    # booleans are not token ids, and an empty list holds nothing
    assert not extract.completions({"prompt": [True, False]}).unjudgeable
    assert extract.completions({"prompt": []}) == UserInput()


def test_responses_prompt_variables_are_the_users() -> None:
    body = {
        "prompt": {
            "id": "pmpt_1",
            "variables": {
                "city": "Paris",
                "question": {"type": "input_text", "text": "what to see?"},
                "photo": {"type": "input_image", "image_url": "https://example.com/p.png"},
                "scan": {"type": "input_image", "file_id": "file-1"},
                "report": {"type": "input_file", "file_id": "file-2"},
                "count": 3,
            },
        },
        "instructions": "the application's words",
    }
    found = extract.responses(body)
    assert found.texts == ("Paris", "what to see?")
    assert found.images == ("https://example.com/p.png",)
    assert found.unjudgeable == ("prompt.variables.scan", "prompt.variables.report")


def test_responses_bare_file_and_audio_items_are_unreadable() -> None:
    body = {
        "input": [
            {"type": "input_file", "file_url": "https://example.com/a.pdf"},
            {"type": "input_audio", "input_audio": {"data": "AAAA", "format": "mp3"}},
            {"type": "function_call_output", "call_id": "c", "output": "a tool's words"},
            {"role": "user", "content": [{"type": "input_file", "file_data": "data:application/pdf;base64,AA"}]},
        ]
    }
    assert extract.responses(body).unjudgeable == ("input[0]", "input[1]", "input[3].content[0]")


def test_conversation_items_are_read_as_a_responses_input() -> None:
    body = {
        "items": [
            {"type": "message", "role": "user", "content": [{"type": "input_text", "text": "remember this"}]},
            {"type": "message", "role": "assistant", "content": [{"type": "output_text", "text": "model words"}]},
            {"type": "message", "role": "user", "content": [{"type": "input_audio", "input_audio": {}}]},
        ],
        "metadata": {"topic": "not judged"},
    }
    found = extract.conversation_items(body)
    assert found == UserInput(texts=("remember this",), unjudgeable=("items[2].content[0]",))


def test_image_and_video_prompts_and_references() -> None:
    assert extract.prompt({"prompt": "a red fox", "model": "gpt-image-1"}).texts == ("a red fox",)
    edit = {
        "prompt": "make it snow",
        "images": [{"image_url": "https://example.com/a.png"}, {"file_id": "file-1"}, "not an object"],
        "mask": {"image_url": "data:image/png;base64,AAAA"},
    }
    assert extract.image_edit(edit) == UserInput(
        texts=("make it snow",),
        images=("https://example.com/a.png", "data:image/png;base64,AAAA"),
        unjudgeable=("images[1]",),
    )
    assert extract.video({"prompt": "waves", "input_reference": {"file_id": "file-2"}}) == UserInput(
        texts=("waves",), unjudgeable=("input_reference",)
    )
    assert extract.video({"prompt": "waves", "input_reference": {"image_url": "https://e.com/r.jpg"}}).images == (
        "https://e.com/r.jpg",
    )


def test_speech_input_is_judged_and_its_instructions_are_not() -> None:
    found = extract.speech({"input": "words to speak", "instructions": "speak softly", "voice": "alloy"})
    assert found == UserInput(texts=("words to speak",))


def test_assistants_threads_messages_and_runs() -> None:
    user = {
        "role": "user",
        "content": [
            {"type": "text", "text": "look at this"},
            {"type": "image_url", "image_url": {"url": "https://example.com/t.png"}},
            {"type": "image_file", "image_file": {"file_id": "file-3"}},
        ],
        "attachments": [{"file_id": "file-4", "tools": [{"type": "file_search"}]}],
    }
    assistant = {"role": "assistant", "content": "the application's words"}
    assert extract.thread({"messages": [assistant, user]}) == UserInput(
        texts=("look at this",),
        images=("https://example.com/t.png",),
        unjudgeable=("messages[1].content[2]", "messages[1].attachments"),
    )
    run_body = {
        "assistant_id": "asst_1",
        "instructions": "app words",
        "additional_instructions": "more app words",
        "thread": {"messages": [{"role": "user", "content": "in the new thread"}]},
        "additional_messages": [{"role": "user", "content": "added"}, assistant],
    }
    assert extract.thread_run(run_body).texts == ("in the new thread", "added")
    assert extract.run(run_body).texts == ("added",)
    assert extract.thread_message(user).unjudgeable == ("content[2]", "attachments")
    assert extract.thread_message({"role": "user", "content": "plain", "attachments": []}).texts == ("plain",)
    assert extract.thread_message(assistant) == UserInput()


def test_an_upload_of_a_batch_file_in_parts_is_unjudgeable() -> None:
    batch = {"purpose": " Batch ", "filename": "b.jsonl", "bytes": 10, "mime_type": "text/jsonl"}
    assert extract.upload(batch) == UserInput(unjudgeable=("purpose",))
    assert extract.upload({"purpose": "vision", "filename": "a.png"}) == UserInput()
    assert extract.upload({"purpose": ["batch"]}) == UserInput()


EXTRACTORS = [
    extract.chat,
    extract.completions,
    extract.responses,
    extract.conversation_items,
    extract.prompt,
    extract.image_edit,
    extract.video,
    extract.speech,
    extract.thread,
    extract.thread_run,
    extract.thread_message,
    extract.run,
    extract.upload,
]
every_key = st.sampled_from(
    [
        *("messages", "prompt", "suffix", "input", "items", "variables", "images", "mask", "input_reference"),
        *("thread", "additional_messages", "attachments", "purpose", "role", "content", "type", "text"),
        *("image_url", "file_id", "url", "user", "input_text", "input_image", "input_file", "image_file"),
    ]
)
hostile_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=8) | every_key,
    lambda children: st.lists(children, max_size=4) | st.dictionaries(every_key | st.text(max_size=4), children),
    max_leaves=40,
)


@given(st.sampled_from(EXTRACTORS), hostile_values)
def test_no_extractor_raises_on_any_json_value(extractor: extract.Extractor, value: Any) -> None:
    for body in (value, {"messages": value, "prompt": value, "input": value, "items": value, "role": "user"}):
        found = extractor(body)
        assert all(isinstance(text, str) and text.strip() for text in found.texts)
        assert all(isinstance(url, str) and url for url in found.images)
        assert all(isinstance(name, str) and name for name in found.unjudgeable)


unreadable_parts = st.sampled_from(
    [
        {"type": "input_audio", "input_audio": {"data": "AAAA", "format": "wav"}},
        {"type": "file", "file": {"file_id": "file-1"}},
        {"type": "input_file", "file_id": "file-1"},
        {"type": "input_image", "file_id": "file-1"},
        {"type": "image_file", "image_file": {"file_id": "file-1"}},
    ]
)


@given(st.lists(user_texts, min_size=1, max_size=6), unreadable_parts, st.data())
def test_an_unreadable_part_is_named_where_it_stands(
    texts: list[str], part: dict[str, Any], data: st.DataObject
) -> None:
    content: list[Any] = [{"type": "text", "text": text} for text in texts]
    at = data.draw(st.integers(0, len(content)))
    content.insert(at, part)
    messages = [{"role": "system", "content": "s"}, {"role": "user", "content": content}]
    found = extract.chat({"messages": messages})
    assert found.unjudgeable == (f"messages[1].content[{at}]",)
    assert found.texts == tuple(dict.fromkeys(texts))
    items = extract.responses({"input": [{"role": "user", "content": content}]})
    assert items.unjudgeable == (f"input[0].content[{at}]",)
