"""Docstring corpus and rater: a hand-written fake standard library with known expected examples, the real one's
split properties, ROUGE-L against an LCS written here, majority votes and a Condorcet cycle built by hand, and the
label-noise rate against scipy's binomial test."""
import hashlib
import os
import textwrap

import numpy as np
import pytest
from scipy import stats

from nash_lm.games import population
from nash_lm.tasks import docstrings, rater as rater_lib

FAKE_MODULE = textwrap.dedent('''
    """Tools for a fake module used in tests.

    This body explains what the fake module does in more than eight words here.
    """

    def good(x):
        """Return the square of the given number.

        The argument x may be any object that supports multiplication by itself.
        """

    def one_line():
        """Only one line here."""

    def long_summary():
        """This summary line is much too long to be kept by the corpus filter at all.

        It has a body with enough words to pass the body filter anyway.
        """

    def doctest_only():
        """Show an example of the doctest filter.

        >>> doctest_only() is None and more words to make it long enough
        """

    class Thing:
        """A thing with a method.

        Things are containers for one value and a few helper methods of interest.
        """

        def method(self):
            """Compute the value of the thing.

            The value is computed lazily and cached on the instance for later calls.
            """

    def duplicate():
        """Return the square of the given number.

        Another body that has a duplicate summary and should therefore be dropped.
        """
''')


def test_harvest_fake_stdlib(tmp_path):
    pkg = tmp_path / "pkg"
    pkg.mkdir()
    (pkg / "__init__.py").write_text(FAKE_MODULE)
    (tmp_path / "tests").mkdir()
    (tmp_path / "tests" / "skipped.py").write_text(FAKE_MODULE)
    (tmp_path / "config-3.12-x86_64-linux-gnu").mkdir()  # the interpreter's build files, any version: skipped
    (tmp_path / "config-3.12-x86_64-linux-gnu" / "python-config.py").write_text(FAKE_MODULE)
    (tmp_path / "broken.py").write_text("def f(:\n")
    cfg = docstrings.CorpusConfig(min_summary_words=3, max_summary_words=10, min_body_words=8)
    ex = docstrings.harvest(cfg, root=str(tmp_path))
    got = {(e["id"], e["response"], e["prompt"]) for e in ex}
    assert got == {
        ("pkg:", "Tools for a fake module used in tests.",
         "This body explains what the fake module does in more than eight words here."),
        ("pkg:good", "Return the square of the given number.",
         "The argument x may be any object that supports multiplication by itself."),
        ("pkg:Thing", "A thing with a method.",
         "Things are containers for one value and a few helper methods of interest."),
        ("pkg:Thing.method", "Compute the value of the thing.",
         "The value is computed lazily and cached on the instance for later calls."),
    }
    by_id = {e["id"]: e for e in ex}
    assert by_id["pkg:good"]["source"].startswith("Return the square of the given number.\n\nThe argument")
    for e in ex:
        assert e["split"] == docstrings.split_of(e["id"], cfg)


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    return docstrings.load(str(tmp_path_factory.mktemp("corpus")))


def test_real_stdlib_corpus_and_split(corpus):
    assert len(corpus) > 1000
    ids = [e["id"] for e in corpus]
    assert len(set(ids)) == len(ids)
    n = {s: len(docstrings.split(corpus, s)) for s in docstrings.SPLITS}
    assert sum(n.values()) == len(corpus)
    for s, frac in (("valid", 0.05), ("test", 0.05)):
        assert stats.binomtest(n[s], len(corpus), frac).pvalue > 1e-3
    for e in corpus:
        assert 3 <= len(e["response"].split()) <= 12 and "\n" not in e["response"]
        assert len(e["prompt"]) <= 400 and e["prompt"].strip()
    # the split of an example is the documented function of its id alone: the first 8 bytes of
    # SHA-256("split\0" + id) as a fraction u of 2**64; test if u < 0.05, valid if u < 0.10, else train
    for e in corpus:
        u = int.from_bytes(hashlib.sha256(b"split\0" + e["id"].encode()).digest()[:8], "big") / 2.0 ** 64
        assert e["split"] == ("test" if u < 0.05 else "valid" if u < 0.10 else "train"), e["id"]


def test_corpus_cache(corpus, tmp_path):
    first = docstrings.load(str(tmp_path))
    files = os.listdir(tmp_path)
    assert len(files) == 1 and first == corpus
    assert docstrings.load(str(tmp_path)) == first


def _lcs(a, b):
    t = [[0] * (len(b) + 1) for _ in range(len(a) + 1)]
    for i in range(len(a)):
        for j in range(len(b)):
            t[i + 1][j + 1] = t[i][j] + 1 if a[i] == b[j] else max(t[i][j + 1], t[i + 1][j])
    return t[-1][-1]


REF = "return the sorted list of items"
SRC = REF + "\n\nthe items are compared with key and the result is a new list"
A = "return the sorted list of items zzz qqq www vvv"
B = "return the sorted xx yy zz"
C = "compared with key and result"


def test_criteria_against_hand_computation():
    r = rater_lib.Rater()
    for cand in (A, B, C, "list sorted the", ""):
        s = r.scores(cand, REF, SRC)
        lcs = _lcs(cand.split(), REF.split())
        p, q = (lcs / len(cand.split()) if cand else 0.0), lcs / len(REF.split())
        f = 2 * p * q / (p + q) if lcs else 0.0
        assert abs(s["rouge"] - f) < 1e-12
        assert s["length"] == abs(len(cand.split()) - 6)
    assert r.scores(A, REF, SRC)["faithfulness"] == pytest.approx(0.6)
    assert r.scores(B, REF, SRC)["faithfulness"] == pytest.approx(0.5)
    assert r.scores(C, REF, SRC)["faithfulness"] == 1.0
    assert r.scores("", REF, SRC)["faithfulness"] == 0.0


def test_majority_vote_and_condorcet_cycle():
    r = rater_lib.Rater(noise=0.0)
    kw = dict(references=[REF] * 3, sources=[SRC] * 3)
    votes = r.votes(["x"] * 3, [A, B, C], [B, C, A], **kw)
    np.testing.assert_array_equal(votes, [[1, -1, 1], [1, 1, -1], [-1, 1, 1]])
    np.testing.assert_array_equal(r(["x"] * 3, [A, B, C], [B, C, A], **kw), [1.0, 1.0, 1.0])  # A>B>C>A
    # a tie on every criterion, and one vote each way with a tie: verdict 1/2
    assert r(["x"], [B], [B], references=[REF], sources=[SRC])[0] == 0.5
    d1, d2 = "return the sorted list of foo", "return the sorted list of bar"  # identical rouge and length
    v = r.votes(["x"], [d1], [d2], references=[REF], sources=[SRC + " foo"])
    np.testing.assert_array_equal(v, [[0, 0, 1]])
    assert r(["x"], [d1], [d2], references=[REF], sources=[SRC + " foo"])[0] == 1.0


def test_cycle_rate_equals_a_hand_count():
    """Five summaries of the reference "alpha beta gamma delta": by the criteria (rouge, length distance,
    faithfulness to the source) X = (2/3, 4, 1/2), Y = V = (1/4, 0, 1/4), Z = (0, 2, 1), W = (1, 0, 1).
    Rouge orders X > Y > Z, length Y > Z > X, faithfulness Z > X > Y: the majority is the cycle X > Y > Z > X
    (and X > V > Z > X); W beats every other on two criteria or more; Y and V are identical (a tie). Of the
    C(5, 3) = 10 triples, by hand exactly two are cyclic: {X, Y, Z} and {X, V, Z}."""
    ref, src = "alpha beta gamma delta", "alpha beta gamma delta epsilon zeta eta theta"
    X, Y, Z, W = "alpha beta gamma delta q1 q2 q3 q4", "alpha w1 w2 w3", "epsilon zeta", ref
    r = rater_lib.Rater(noise=0.2)
    assert [round(r.scores(t, ref, src)["rouge"], 6) for t in (X, Y, Z, W)] == [round(2 / 3, 6), 0.25, 0.0, 1.0]
    assert [r.scores(t, ref, src)["length"] for t in (X, Y, Z, W)] == [4, 0, 2, 0]
    assert [r.scores(t, ref, src)["faithfulness"] for t in (X, Y, Z, W)] == [0.5, 0.25, 1.0, 1.0]
    assert r.cycles([X, Y, Z, W, Y], ref, src) == (2, 10)
    assert r.cycles([X, Y, Z], ref, src) == (1, 1)
    assert r.cycles([X, Z, Y], ref, src) == (1, 1)  # the other orientation
    assert r.cycles([X, Y, W, W], ref, src) == (0, 4)
    assert r.cycles([X, Y], ref, src) == (0, 0)
    # the shared counter alone on a matrix whose cycles are known: the 5-cycle tournament 0>1>2>3>4>0 with 0>2, 1>3,
    # 2>4, 3>0, 4>1 (each beats the next two) has 5 cyclic triples of its 10
    v = np.full((5, 5), 0.5)
    for a in range(5):
        for d in (1, 2):
            v[a, (a + d) % 5], v[(a + d) % 5, a] = 1.0, 0.0
    assert population.cyclic_triples(v) == 5


def test_antisymmetry_and_lookup(corpus):
    r = rater_lib.Rater(corpus[:50], noise=0.15)
    prompts = [e["prompt"] for e in corpus[:20]]
    ys = [e["response"] for e in corpus[:20]]
    y2s = [e["response"] for e in corpus[20:40]]
    p, q = r(prompts, ys, y2s), r(prompts, y2s, ys)
    np.testing.assert_array_equal(p + q, 1.0)
    assert set(np.unique(p)) <= {0.15, 0.5, 0.85}
    np.testing.assert_array_equal(r(prompts, ys, ys), 0.5)
    assert np.all(p[:] >= 0.5)  # each prompt's own reference beats another prompt's summary or ties
    with pytest.raises(KeyError, match="no reference"):
        r(["not a prompt"], ["a"], ["b"])


def test_label_noise_rate():
    noise, n = 0.2, 4000
    r = rater_lib.Rater(noise=noise, seed=123)
    kw = dict(references=[REF] * n, sources=[SRC] * n)
    labels = r.labels(["x"] * n, [A] * n, [B] * n, **kw)  # the noiseless verdict is 1 (A beats B)
    flipped = int(np.sum(labels == 0))
    assert stats.binomtest(flipped, n, noise).pvalue > 1e-3
    again = rater_lib.Rater(noise=noise, seed=123).labels(["x"] * n, [A] * n, [B] * n, **kw)
    np.testing.assert_array_equal(labels, again)


def test_token_oracle_matches_text_rater(corpus, tmp_path):
    from nash_lm.data import features, tokenizer

    examples = corpus[:30]
    tok = tokenizer.train_sentencepiece([e["prompt"] + " " + e["response"] for e in examples], 200,
                                        str(tmp_path))
    r = rater_lib.Rater(examples, noise=0.1)
    oracle = rater_lib.token_oracle(r, features.TextFormat(tok, 16, 40), examples)
    arr = features.to_arrays([{"prompt": e["prompt"], "chosen": e["response"], "rejected": examples[-1 - i]["response"]}
                              for i, e in enumerate(examples[:10])], "preference", tok, 16, 40)
    got = oracle(arr["prompt"], arr["prompt_mask"], arr["y"], arr["y_mask"], arr["y2"], arr["y2_mask"])
    ys = [features.decode_response(tok, a, m) for a, m in zip(arr["y"], arr["y_mask"])]
    y2s = [features.decode_response(tok, a, m) for a, m in zip(arr["y2"], arr["y2_mask"])]
    want = r([e["prompt"] for e in examples[:10]], ys, y2s)
    np.testing.assert_allclose(got, want)
