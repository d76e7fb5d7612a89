"""Search across the saved chats (SQLite FTS5): what it finds, for whom, and that no text the user types can
turn into an FTS5 operator, a column filter or SQL."""

import random
import sqlite3

import pytest

from chat import history
from chat.history import HistoryStore, SearchUnavailable, fts_query


def msg(role, content):
    return {"role": role, "content": content, "reasoning": None, "files": [], "stats": None}


@pytest.fixture
def store(tmp_path):
    store = HistoryStore(tmp_path / "history.sqlite3")
    yield store
    store.close()


def chat(store, owner, *texts, title=None) -> str:
    """A conversation of alternating user and assistant messages."""
    cid = store.create(owner, title=title)
    store.save_messages(owner, cid, [msg("user" if i % 2 == 0 else "assistant", t) for i, t in enumerate(texts)])
    return cid


def found(store, query, owner="alice", **kwargs) -> list[str]:
    return [hit.conversation_id for hit in store.search(owner, query, **kwargs)]


def test_fts5_is_there_in_this_python():
    sqlite3.connect(":memory:").execute("CREATE VIRTUAL TABLE t USING fts5(x)")


# -- the query ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("typed", "query"),
    [
        ("cat", '"cat"*'),
        ("cat ", '"cat"'),  # a word followed by a space is finished
        ("black cat", '"black" "cat"*'),
        ('say "hi', '"say" """hi"*'),
        ("NEAR(cat dog)", '"NEAR(cat" "dog)"*'),
        ("cat AND dog OR NOT fish", '"cat" "AND" "dog" "OR" "NOT" "fish"*'),
        ("title:secret", '"title:secret"*'),
        ("{content title}: x", '"{content" "title}:" "x"*'),
        ("-cat +dog ^fish", '"-cat" "+dog" "^fish"*'),
        ("cat* ***", '"cat*"'),  # the last chunk has no word: nothing is a prefix
        ("café", '"café"*'),
        ("  東京  ", '"東京"'),
    ],
)
def test_every_typed_chunk_becomes_one_quoted_fts5_string(typed, query):
    assert fts_query(typed) == query


def test_prefix_search_can_be_turned_off():
    assert fts_query("black cat", prefix=False) == '"black" "cat"'


@pytest.mark.parametrize("typed", ["", "   ", "***", '""', "()", "- + ^ :", "\x00", "🙂 🙃"])
def test_a_query_without_words_is_no_query(typed):
    assert fts_query(typed) is None


def test_a_huge_query_is_cut_to_a_few_terms():
    assert fts_query("word " * 10_000).count('"word"') == history.QUERY_MAX_TERMS


# -- what search finds ---------------------------------------------------------------------------


def test_search_finds_titles_and_message_text_with_snippets(store):
    cats = chat(store, "alice", "Tell me about cats", "Cats sleep most of the day.", title="Pets")
    chat(store, "alice", "And dogs?", "Dogs like walks.")
    hits = store.search("alice", "sleep")
    assert [(h.conversation_id, h.title, h.index) for h in hits] == [(cats, "Pets", 1)]
    (hit,) = hits
    assert hit.message_id == store.tree("alice", cats)[1].id
    assert hit.snippet == "Cats sleep most of the day."
    assert [hit.snippet[a:b] for a, b in hit.highlights] == ["sleep"]
    assert hit.marked() == "Cats «sleep» most of the day."

    (title_hit,) = store.search("alice", "pets")
    assert (title_hit.message_id, title_hit.index, title_hit.marked()) == (None, None, "«Pets»")


def test_search_needs_every_word_and_ranks_the_better_match_first(store):
    weak = chat(store, "alice", "a long message about many things, one of them is the weather " * 5)
    strong = chat(store, "alice", "weather weather forecast")
    chat(store, "alice", "nothing to see")
    assert found(store, "weather") == [strong, weak]
    assert found(store, "weather forecast") == [strong]
    hits = store.search("alice", "weather")
    assert hits[0].rank < hits[1].rank  # bm25: lower is better


def test_search_gives_each_chat_once_with_its_best_match(store):
    cid = chat(store, "alice", "rain", "rain rain", "more rain today", title="Rain talk")
    (hit,) = store.search("alice", "rain")
    assert hit.conversation_id == cid
    assert hit.message_id is None  # the title, weighted above the messages


def test_search_limit_caps_the_number_of_chats(store):
    for n in range(5):
        chat(store, "alice", f"topic number {n}")
    assert len(store.search("alice", "topic", limit=3)) == 3
    assert store.search("alice", "topic", limit=0) == []


def test_search_never_returns_another_owners_chats(store):
    chat(store, "alice", "my secret plan", title="secret")
    bob = chat(store, "bob", "bob's secret too")
    assert found(store, "secret", owner="bob") == [bob]
    assert found(store, '" OR owner:alice OR "', owner="bob") == []
    assert found(store, "alice", owner="bob") == []


def test_search_matches_prefixes_as_the_user_types(store):
    cid = chat(store, "alice", "Let's meet at the café", "Sure, at noon")
    assert found(store, "caf") == [cid]
    assert found(store, "caf ") == []  # a finished word matches whole words only
    assert found(store, "caf", prefix=False) == []
    assert found(store, "meet caf") == [cid]
    assert found(store, "me caf") == []  # only the last word is a prefix


@pytest.mark.parametrize(
    ("text", "query"),
    [
        ("Let's meet at the café", "cafe"),
        ("Let's meet at the cafe", "CAFÉ"),
        ("une idée naïve", "NAIVE IDEE"),
        ("Ångström units", "angstrom"),
        ("Привет, мир", "ПРИВЕТ"),
        ("Καλημέρα κόσμε", "ΚΑΛΗΜΈΡΑ"),  # Greek accents stay: remove_diacritics is for Latin letters
        ("Grüße aus Köln", "grüße KOLN"),
        ("東京タワーに行った", "東京"),  # no word breaks in CJK: found by its start only
        ("I ❤️ emoji 🙂", "emoji"),
    ],
)
def test_search_folds_case_and_accents_in_any_script(store, text, query):
    cid = chat(store, "alice", text)
    assert found(store, query) == [cid]


def test_search_treats_quotes_and_operators_as_text(store):
    pets = chat(store, "alice", "the cat chased the dog")
    rules = chat(store, "alice", 'rule: "cat" OR dog, NOT both (near the door)')
    # As FTS5 syntax each of these would find the first chat (or fail); as text they need their words.
    assert found(store, "cat OR fish") == []
    assert found(store, "cat NOT dog") == [rules]
    assert found(store, 'NEAR("cat" "dog")') == []  # the phrase "near cat", then "dog"
    assert found(store, "NEAR door") == [rules]
    assert found(store, '"cat" OR dog') == [rules]
    assert found(store, "content:cat") == []  # no column filter: the words "content" and "cat"
    assert sorted(found(store, "cat dog")) == sorted([pets, rules])
    assert found(store, "(near the door)") == [rules]
    assert found(store, '"chased the dog"') == [pets]
    assert found(store, "chased-the-dog") == [pets]  # a chunk is a phrase: its words, in order
    assert found(store, "dog-the-chased") == []


@pytest.mark.parametrize(
    "typed",
    [
        "'); DROP TABLE messages; --",
        '" OR 1=1 --',
        "x' UNION SELECT owner, id FROM conversations --",
        "* OR *",
        "NEAR(",
        'a"b"c""d',
        "{messages_fts}:x",
        "rank:1",
        "\x00; DELETE FROM conversations",
        "\ud800 broken surrogate",
        "half\ud800surrogate",
        "nul\x00inside",
        "a" * 5000,
    ],
)
def test_injection_attempts_are_only_text(store, typed):
    cid = chat(store, "alice", "harmless text")
    store.search("alice", typed)  # doesn't raise
    assert found(store, "harmless") == [cid]
    assert store.list("alice")[0].message_count == 1


def test_no_random_input_makes_search_raise(store):
    chat(store, "alice", 'some "quoted" text: with (parens) AND operators * ^ - +')
    alphabet = list("abc \"*:-+^(){}[],.;'\\/\x00\t\n") + ["NEAR", "AND", "OR", "NOT", "é", "東", "🙂", "title:"]
    rng = random.Random(16)
    for _ in range(500):
        typed = "".join(rng.choice(alphabet) for _ in range(rng.randint(0, 12)))
        assert isinstance(store.search("alice", typed), list), typed


@pytest.mark.parametrize("typed", ["", "   ", "***", '"', "()", "🙂"])
def test_an_empty_or_garbage_query_finds_nothing(store, typed):
    chat(store, "alice", "anything at all")
    assert store.search("alice", typed) == []


# -- the snippet -----------------------------------------------------------------------------


def test_a_snippet_is_plain_text_and_its_html_is_escaped(store):
    chat(store, "alice", "<script>alert('x')</script> & a cat")
    (hit,) = store.search("alice", "cat")
    assert hit.snippet == "<script>alert('x')</script> & a cat"
    assert hit.html() == "&lt;script&gt;alert(&#x27;x&#x27;)&lt;/script&gt; &amp; a <mark>cat</mark>"


def test_a_long_message_is_cut_around_the_match(store):
    chat(store, "alice", " ".join(f"w{i}" for i in range(200)) + " needle " + " ".join(f"v{i}" for i in range(200)))
    (hit,) = store.search("alice", "needle")
    assert "needle" in hit.snippet and hit.snippet.startswith("…") and hit.snippet.endswith("…")
    assert len(hit.snippet.split()) <= history.SNIPPET_TOKENS


# -- keeping up with the chats -----------------------------------------------------------------


def test_search_follows_renames_streaming_edits_prunes_and_deletes(store):
    cid = chat(store, "alice", "question", "draft answer", title="Old name")
    store.rename("alice", cid, "New name")
    assert found(store, "old name") == [] and found(store, "new name") == [cid]

    store.save_messages("alice", cid, [msg("user", "question"), msg("assistant", "final answer")])  # streamed
    assert found(store, "draft") == [] and found(store, "final") == [cid]

    store.save_messages("alice", cid, [msg("user", "question")], prune=True)
    assert found(store, "final") == []

    store.delete("alice", cid)
    assert found(store, "question") == [] and found(store, "new name") == []


def test_a_hit_in_another_version_opens_that_version(store):
    cid = chat(store, "alice", "question", "first answer")
    store.branch_from("alice", cid, 1, [msg("assistant", "second answer")])
    (hit,) = store.search("alice", "first")
    assert hit.conversation_id == cid and hit.index == 1
    path = store.activate_message("alice", cid, hit.message_id)
    assert path[hit.index]["content"] == "first answer"
    assert store.active_path("alice", cid) == path


def test_system_prompts_are_not_search_hits(store):
    cid = store.create("alice")
    store.save_messages("alice", cid, [msg("system", "You are a pirate."), msg("user", "hello")])
    assert found(store, "pirate") == []
    assert found(store, "hello") == [cid]


# -- without FTS5 ----------------------------------------------------------------------------


def test_without_fts5_search_says_so_and_the_rest_still_works(tmp_path, monkeypatch):
    path = tmp_path / "history.sqlite3"
    before = HistoryStore(path)  # made with FTS5: the index and its triggers exist
    early = chat(before, "alice", "written with an index")
    before.close()

    monkeypatch.setattr(history, "fts5_available", lambda conn: False)
    without = HistoryStore(path)
    assert without.search_available is False
    later = chat(without, "alice", "written without one")  # the triggers are gone, so writes still work
    without.rename("alice", early, "renamed meanwhile")
    with pytest.raises(SearchUnavailable, match="FTS5"):
        without.search("alice", "written")
    with pytest.raises(SearchUnavailable):
        without.search("alice", "")
    without.close()

    monkeypatch.undo()
    again = HistoryStore(path)  # FTS5 back: the index is rebuilt from the text
    assert again.search_available is True
    assert sorted(found(again, "written")) == sorted([early, later])
    assert found(again, "renamed meanwhile") == [early]
    again.close()


def test_a_fresh_file_without_fts5_gets_its_index_once_fts5_is_there(tmp_path, monkeypatch):
    path = tmp_path / "history.sqlite3"
    monkeypatch.setattr(history, "fts5_available", lambda conn: False)
    store = HistoryStore(path)
    cid = chat(store, "alice", "hello there")
    store.close()
    monkeypatch.undo()
    store = HistoryStore(path)
    assert found(store, "hello") == [cid]
    store.close()
