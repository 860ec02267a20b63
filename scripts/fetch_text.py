"""Fetch the project's text from three Debian packages into data/ (idempotent, atomic per file).

  data/calibration.txt        the Python 3.11 documentation sources (python3.11-doc), to calibrate
                              thresholds on
  data/calibration_prose.txt  Herman Melville's Moby-Dick (r-cran-tokenizers' example data), prose
                              to calibrate on that is not the held-out text
  data/heldout/<novel>.txt    Jane Austen's six novels (r-cran-janeaustenr), held out for perplexity

The packages are fetched with `apt-get download` and unpacked with `dpkg-deb -x` in a cache
directory, never installed: the r-cran ones would pull in R.

    python scripts/fetch_text.py
"""
import argparse
import gzip
import os
import shutil
import struct
import subprocess
import zlib
from pathlib import Path

from tqdm import tqdm

from checkpoint import atomic_write_text
from generate import cli
from scripts.common import DATA

PYTHON_DOC = "python3.11-doc"
AUSTEN = "r-cran-janeaustenr"
TOKENIZERS = "r-cran-tokenizers"
DOC_SOURCES = "usr/share/doc/python3.11/html/_sources"
AUSTEN_DATA = "usr/lib/R/site-library/janeaustenr/data/Rdata"
TOKENIZERS_DATA = "usr/lib/R/site-library/tokenizers/data/Rdata"
NOVELS = ("emma", "mansfieldpark", "northangerabbey", "persuasion", "prideprejudice", "sensesensibility")


class FetchError(Exception):
    pass


def apt_download(package, cache):
    """-> path of the package's .deb in cache, downloading it (after an apt-get update if need be)."""
    debs = sorted(cache.glob(f"{package}_*.deb"))
    if debs:
        return debs[-1]
    if shutil.which("apt-get") is None or shutil.which("dpkg-deb") is None:
        raise FetchError("apt-get and dpkg-deb are needed to fetch the text (a Debian-based system)")
    cache.mkdir(parents=True, exist_ok=True)
    download = ["apt-get", "download", package]
    # The package lists may be missing or stale on a fresh machine: update once, then retry.
    if subprocess.run(download, cwd=cache, capture_output=True).returncode != 0:
        subprocess.run(["apt-get", "update"], capture_output=True)
        r = subprocess.run(download, cwd=cache, capture_output=True, text=True)
        if r.returncode != 0:
            last = (r.stderr.strip().splitlines() or ["no output"])[-1]
            raise FetchError(f"apt-get download {package} failed: {last}")
    return sorted(cache.glob(f"{package}_*.deb"))[-1]


def unpacked(package, cache):
    """-> root of the package's unpacked file tree in cache."""
    root = cache / package
    if not root.is_dir():
        deb = apt_download(package, cache)
        tmp = cache / f"{package}.tmp{os.getpid()}"
        subprocess.run(["dpkg-deb", "-x", str(deb), str(tmp)], check=True)
        os.replace(tmp, root)
    return root


class RReader:
    """The subset of R's XDR serialization that janeaustenr's lazy-load database uses."""

    def __init__(self, data):
        if data[:2] != b"X\n":
            raise FetchError("not an R XDR serialization")
        self.data, self.pos, self.refs = data, 2, []
        version = self.int()
        self.pos += 8  # writer's and minimal reader's R versions
        if version == 3:
            self.pos += 4 + self.int()  # the native encoding's name

    def int(self):
        (v,) = struct.unpack_from(">i", self.data, self.pos)
        self.pos += 4
        return v

    def item(self):
        flags = self.int()
        kind, has_attr, has_tag = flags & 0xFF, flags & 0x200, flags & 0x400
        if kind == 254:  # NULL
            return None
        if kind == 255:  # a reference to an earlier symbol
            return self.refs[(flags >> 8) - 1]
        if kind == 1:  # symbol: its name, remembered for later references
            self.refs.append(self.item())
            return self.refs[-1]
        if kind == 2:  # pairlist (attributes): {tag: value, ...}
            if has_attr:
                self.item()  # a pairlist's own attributes: none that matter here
            tag = self.item() if has_tag else None
            out = {tag: self.item()}
            out.update(self.item() or {})
            return out
        if kind == 9:  # CHARSXP: length (-1 is NA) then the bytes
            n = self.int()
            s = None if n == -1 else self.data[self.pos:self.pos + n].decode("utf-8")
            self.pos += max(n, 0)
            return s
        n = self.int()
        if kind in (10, 13):  # logical, integer
            v = list(struct.unpack_from(f">{n}i", self.data, self.pos))
            self.pos += 4 * n
        elif kind in (16, 19):  # character vector, list
            v = [self.item() for _ in range(n)]
        else:
            raise FetchError(f"unexpected R object type {kind}")
        if has_attr:
            attrs = self.item()
            if "names" in attrs:
                v = dict(zip(attrs["names"], v))
        return v


def r_data(base, names):
    """-> {name: value} of the named objects in an R package's lazy-load database base.rdx/.rdb."""
    index = RReader(gzip.decompress(base.with_suffix(".rdx").read_bytes())).item()["variables"]
    rdb = base.with_suffix(".rdb").read_bytes()
    out = {}
    for name in names:
        offset, length = index[name]
        # Each entry: 4-byte big-endian uncompressed length, then zlib data.
        out[name] = RReader(zlib.decompress(rdb[offset + 4:offset + length])).item()
    return out


def austen_novels(root):
    """-> {novel: text}: each novel is a character vector of lines in the package's .rdb."""
    return {name: "\n".join(line or "" for line in lines) + "\n" for name, lines in r_data(root / AUSTEN_DATA, NOVELS).items()}


def gutenberg_body(text):
    """The book alone: a Project Gutenberg e-text less its header and license, with \\n line ends."""
    lines = text.lstrip("\ufeff").replace("\r\n", "\n").split("\n")
    start = next((i for i, line in enumerate(lines) if line.startswith("*** START OF")), None)
    end = next((i for i, line in enumerate(lines) if line.startswith("*** END OF")), None)
    if start is None or end is None or end < start:
        raise FetchError("no Project Gutenberg START/END markers in the text")
    return "\n".join(lines[start + 1:end]).strip("\n") + "\n"


def moby_dick(root):
    # A named character vector of one element: the whole e-text, \r\n line ends.
    (text,) = r_data(root / TOKENIZERS_DATA, ["mobydick"])["mobydick"].values()
    return gutenberg_body(text)


def python_docs(root):
    files = sorted((root / DOC_SOURCES).rglob("*.rst.txt"))
    if not files:
        raise FetchError(f"no .rst.txt sources in {PYTHON_DOC}")
    return "\n\n".join(f.read_text(encoding="utf-8") for f in files)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", type=Path, default=DATA, help="where the text goes")
    parser.add_argument("--cache", type=Path, default=Path.home() / ".cache" / "teal" / "debs", help="where the .debs are unpacked")
    args = parser.parse_args(argv)

    calibration = args.data / "calibration.txt"
    prose = args.data / "calibration_prose.txt"
    heldout = [args.data / "heldout" / f"{name}.txt" for name in NOVELS]
    steps = [(PYTHON_DOC, [calibration]), (TOKENIZERS, [prose]), (AUSTEN, heldout)]
    with tqdm(total=len(steps), desc="fetch text", unit="package") as bar:
        for package, outputs in steps:
            bar.set_postfix_str(package)
            if not all(p.exists() for p in outputs):
                root = unpacked(package, args.cache)
                if package == PYTHON_DOC:
                    atomic_write_text(calibration, python_docs(root))
                elif package == TOKENIZERS:
                    atomic_write_text(prose, moby_dick(root))
                else:
                    for name, text in austen_novels(root).items():
                        atomic_write_text(args.data / "heldout" / f"{name}.txt", text)
            bar.update()
    print(f"text in {args.data}: {calibration.name} ({calibration.stat().st_size / 1e6:.1f} MB), "
          f"{prose.name} ({prose.stat().st_size / 1e6:.1f} MB), "
          f"heldout/ ({sum(p.stat().st_size for p in heldout) / 1e6:.1f} MB, {len(heldout)} novels)")


if __name__ == "__main__":
    cli(main, errors=(FetchError,))
