"""One rule for token files: the CLI (``ledger.secretfile``) refuses what the SPANK plugin's
``read_token_file`` refuses, in the same words — checked by running both on the same files
(the C function compiled from slurm_plugin/spank/gpuledger_spank.c as it is)."""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest
from conftest import need

from ledger.errors import InvalidInput
from ledger.secretfile import MAX_BYTES, SecretWriter, read_secret_file

SPANK = Path(__file__).resolve().parents[1] / "slurm_plugin" / "spank" / "gpuledger_spank.c"
HARNESS = r"""
#include <stdarg.h>
#include "%s"
void slurm_error(const char *fmt, ...)
{
	va_list ap;
	va_start(ap, fmt);
	vprintf(fmt, ap);
	va_end(ap);
	printf("\n");
}
/* what the rest of the plugin calls in Slurm: never reached from read_token_file */
spank_context_t spank_context(void) { return S_CTX_ERROR; }
spank_err_t spank_job_control_setenv(spank_t s, const char *v, const char *x, int o)
{ (void) s; (void) v; (void) x; (void) o; return ESPANK_ERROR; }
spank_err_t spank_option_register(spank_t s, struct spank_option *o)
{ (void) s; (void) o; return ESPANK_ERROR; }
const char *spank_strerror(spank_err_t e) { (void) e; return "stub"; }
int main(int argc, char **argv)
{
	(void) argc;
	char *text = read_token_file(argv[1]);
	if (text)
		printf("OK %%s", text);
	return text ? 0 : 1;
}
"""


@pytest.fixture(scope="module")
def plugin_rule(tmp_path_factory):
    """The plugin's read_token_file as a program: prints its error, or OK and the text."""
    have = shutil.which("cc") is not None and Path("/usr/include/slurm/spank.h").exists()
    need(have, "cc and Slurm's headers (apt install gcc libslurm-dev)")
    tmp = tmp_path_factory.mktemp("spank")
    (tmp / "harness.c").write_text(HARNESS % SPANK)
    exe = tmp / "read_token_file"
    subprocess.run(["cc", "-o", str(exe), str(tmp / "harness.c")], check=True,
                   capture_output=True, text=True)

    def read(path: Path) -> str:
        out = subprocess.run([str(exe), str(path)], capture_output=True, text=True,
                             check=False)  # exit 1: a refused file, its error printed
        return out.stdout.strip()

    return read


def files(tmp: Path) -> list[Path]:
    made = []

    def token(name: str, mode: int, text: str = "glt1.abc\n") -> None:
        p = tmp / name
        p.write_text(text)
        p.chmod(mode)
        made.append(p)

    token("ok", 0o600)
    token("ok-readonly", 0o400)
    token("others-read", 0o644)
    token("group-read", 0o640)
    token("group-write", 0o620)
    token("others-exec", 0o601)
    token("large", 0o600, "x" * (MAX_BYTES + 1))
    (tmp / "dir").mkdir()
    made.append(tmp / "dir")
    made.append(tmp / "missing")
    os.symlink(tmp / "ok", tmp / "link-to-ok")
    made.append(tmp / "link-to-ok")
    if os.getuid() == 0:  # a file of another user (root may chown)
        token("someone-elses", 0o600)
        os.chown(tmp / "someone-elses", 4242, 4242)
    return made


def test_the_cli_and_the_plugin_refuse_the_same_files_in_the_same_words(plugin_rule,
                                                                        tmp_path):
    for path in files(tmp_path):
        plugin = plugin_rule(path)
        try:
            mine = "OK " + read_secret_file(path).strip()
        except InvalidInput as exc:
            mine = f"gpu-token: {exc}"
        assert mine == plugin, path


def test_a_refused_file_is_named_without_the_plugin(tmp_path):
    p = tmp_path / "t"
    p.write_text("glt1.x\n")
    p.chmod(0o644)
    with pytest.raises(InvalidInput, match=r"is readable by others \(mode 0644\); chmod 600"):
        read_secret_file(p)
    p.chmod(0o600)
    assert read_secret_file(p) == "glt1.x\n"


def test_the_writer_never_overwrites_and_undo_restores(tmp_path):
    p = tmp_path / "t"
    w = SecretWriter(p)
    w.prepare()
    w.write("first")
    assert p.read_text() == "first\n" and oct(p.stat().st_mode & 0o777) == "0o600"
    with pytest.raises(InvalidInput, match="exists; refusing to overwrite"):
        SecretWriter(p).prepare()
    forced = SecretWriter(p, force=True)
    forced.write("second")
    assert p.read_text() == "second\n" and Path(f"{p}.~1~").read_text() == "first\n"
    forced.undo()  # the operation failed after all: the first token is back in place
    assert p.read_text() == "first\n" and not Path(f"{p}.~1~").exists()
    fresh = SecretWriter(tmp_path / "u")
    fresh.write("a")
    fresh.write("b")  # the transaction run again: the second write replaces the first
    assert (tmp_path / "u").read_text() == "b\n"
    fresh.undo()
    assert not (tmp_path / "u").exists()
    assert sorted(x.name for x in tmp_path.iterdir()) == ["t"]
