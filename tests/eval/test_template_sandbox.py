"""Task templates are data from anywhere: they render sandboxed, and an escape attempt stops the
evaluation (exit 2) before anything runs."""

from __future__ import annotations

import json
import sys

import pytest

from eval.taskspec import DocError, resolve
from tests.conftest import REPO, run_cmd

# Classic escapes from a Jinja template to Python; each would run `touch MARKER` (or list every
# class, the first step towards one) in a plain jinja2.Environment.
ESCAPES = [
    "{{ ''.__class__.__mro__[1].__subclasses__() }}",
    "{{ cycler.__init__.__globals__.os.popen('touch MARKER').read() }}",
    "{{ joiner.__init__.__globals__.os.popen('touch MARKER').read() }}",
    "{{ lipsum.__globals__['os'].popen('touch MARKER').read() }}",
    "{{ self.__init__.__globals__.__builtins__.__import__('os').system('touch MARKER') }}",
    "{{ q.__class__.__base__.__subclasses__() }}",
    "{{ '{0.__class__.__mro__}'.format(q) }}",
]


def test_the_escapes_do_run_code_without_a_sandbox(tmp_path):
    """The control: the templates above are real exploits for an unsandboxed environment."""
    import jinja2

    marker = tmp_path / "marker"
    for template in ESCAPES[1:5]:
        jinja2.Environment().from_string(template.replace("MARKER", str(marker))).render(q="x")
        assert marker.exists(), template
        marker.unlink()


@pytest.mark.parametrize("template", ESCAPES)
def test_escapes_are_refused(tmp_path, template):
    marker = tmp_path / "marker"
    with pytest.raises(DocError) as e:
        resolve(template.replace("MARKER", str(marker)), {"q": "x"}, "doc_to_text", False)
    assert "template refused" in str(e.value) or "is undefined" in str(e.value)
    assert not marker.exists()


def test_plain_templates_still_render():
    doc = {"question": "Why?", "choices": ["a", "b"], "label": 1}
    assert resolve("Q: {{question}}\nA:", doc, "doc_to_text", True) == "Q: Why?\nA:"
    assert resolve("{{choices}}", doc, "doc_to_choice", True) == ["a", "b"]
    assert resolve("{{ question | upper | regex_replace('[?]', '!') }}", doc, "doc_to_text", False) == "WHY!"
    assert resolve("{% for c in choices %}{{ loop.index }}{{ c }} {% endfor %}", doc, "doc_to_text", False) == "1a 2b "


def test_cli_refuses_a_crafted_task_and_runs_nothing(tmp_path):
    marker = tmp_path / "marker"
    data = tmp_path / "d.jsonl"
    data.write_text(json.dumps({"q": "x", "label": 0}) + "\n")
    template = json.dumps(ESCAPES[4].replace("MARKER", str(marker)))  # a JSON string is a YAML scalar
    spec = tmp_path / "evil.yaml"
    spec.write_text(f"task: evil\ndataset_path: json\ndataset_kwargs: {{data_files: {{test: {data}}}}}\n"
                    f"test_split: test\noutput_type: multiple_choice\ndoc_to_text: {template}\n"
                    "doc_to_target: label\ndoc_to_choice: ['yes', 'no']\n")
    # the tasks are prepared before the model is read: no model is needed to show the refusal
    proc = run_cmd([sys.executable, "-m", "eval", "--model", str(tmp_path / "no-model"), "--tasks", str(spec)],
                   cwd=REPO, check=False)
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert "task evil: sample 0" in proc.stderr and "template refused" in proc.stderr
    assert "Traceback" not in proc.stderr
    assert not marker.exists()
