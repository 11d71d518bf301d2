import io
import json

import pytest
from prometheus_client.parser import text_string_to_metric_families

from cargobay.logs import level_from_environment, make_observer
from cargobay.metrics import Metrics


def test_metrics_render_parses_with_prometheus_client():
    metrics = Metrics()
    metrics.requests.inc(1, "blob", "GET", "200")
    metrics.bytes_served.inc(1234, "cache")
    metrics.upstream_latency.observe(0.02, "hub")
    metrics.upstream_latency.observe(3.0, "hub")
    metrics.gauge("cargobay_cache_size_bytes", "size", lambda: 42)
    families = {f.name: f for f in text_string_to_metric_families(metrics.render().decode())}
    [sample] = families["cargobay_http_requests"].samples
    assert sample.labels == {"route": "blob", "method": "GET", "status": "200"} and sample.value == 1
    assert families["cargobay_served_bytes"].samples[0].value == 1234
    histogram = {(s.name, s.labels.get("le")): s.value for s in families["cargobay_upstream_request_duration_seconds"].samples}
    assert histogram[("cargobay_upstream_request_duration_seconds_count", None)] == 2
    assert histogram[("cargobay_upstream_request_duration_seconds_bucket", "0.025")] == 1
    assert histogram[("cargobay_upstream_request_duration_seconds_bucket", "+Inf")] == 2
    assert families["cargobay_cache_size_bytes"].samples[0].value == 42


def test_big_counters_are_rendered_in_full():
    metrics = Metrics()
    metrics.bytes_served.inc(10 * 1024**3, "cache")
    metrics.requests.inc(1_234_567, "blob", "GET", "200")
    metrics.upstream_latency.observe(0.123456789, "hub")
    families = {f.name: f for f in text_string_to_metric_families(metrics.render().decode())}
    assert families["cargobay_served_bytes"].samples[0].value == 10 * 1024**3
    assert families["cargobay_http_requests"].samples[0].value == 1_234_567
    before = metrics.render()
    metrics.requests.inc(4, "blob", "GET", "200")
    assert metrics.render() != before
    assert "10737418240" in before.decode() and "0.123456789" in before.decode()


def test_every_metric_is_rendered():
    # A metric defined and counted but left out of render() is invisible.
    from cargobay.metrics import _Metric

    metrics = Metrics()
    defined = {m.name for m in vars(metrics).values() if isinstance(m, _Metric)}
    rendered = metrics.render().decode()
    assert defined and all(f"# TYPE {name} " in rendered for name in defined), defined


def test_a_counter_without_labels_has_a_sample_before_its_first_event():
    # rate() and absent() alerts need the series from the first scrape on;
    # a counter with labels has none until a label set is counted.
    metrics = Metrics()
    families = {f.name: f for f in text_string_to_metric_families(metrics.render().decode())}
    [sample] = families["cargobay_cache_evictions"].samples
    assert sample.name == "cargobay_cache_evictions_total" and sample.value == 0
    assert families["cargobay_http_requests"].samples == []
    metrics.evictions.inc()
    families = {f.name: f for f in text_string_to_metric_families(metrics.render().decode())}
    assert families["cargobay_cache_evictions"].samples[0].value == 1


def test_log_level_from_environment():
    assert level_from_environment({}, "info") == "info"
    assert level_from_environment({"CARGOBAY_LOG_LEVEL": "DEBUG"}, "info") == "debug"
    assert level_from_environment({"RUST_LOG": "docker_registry_proxy=warn"}, "info") == "warn"
    assert level_from_environment({"RUST_LOG": "garbage"}, "error") == "error"
    # Our own target's level, not the last one named (another crate's).
    assert level_from_environment({"RUST_LOG": "docker_registry_proxy=debug,hyper=warn"}, "info") == "debug"
    assert level_from_environment({"RUST_LOG": "warn,hyper=debug"}, "info") == "warn"
    assert level_from_environment({"RUST_LOG": "hyper=debug"}, "info") == "info"
    # env_logger's "off", and a target alone meaning all of its lines.
    assert level_from_environment({"RUST_LOG": "off"}, "info") == "off"
    assert level_from_environment({"RUST_LOG": "docker_registry_proxy=off,hyper=warn"}, "info") == "off"
    assert level_from_environment({"RUST_LOG": "docker_registry_proxy"}, "info") == "debug"
    assert level_from_environment({"RUST_LOG": "hyper"}, "warn") == "warn"


def test_rust_log_off_silences_the_log(monkeypatch):
    from twisted.logger import Logger

    monkeypatch.delenv("CARGOBAY_LOG_LEVEL", raising=False)
    monkeypatch.setenv("RUST_LOG", "off")
    stream = io.StringIO()
    log = Logger(namespace="test", observer=make_observer("text", "info", stream))
    log.critical("even this")
    log.info("and this")
    assert stream.getvalue() == ""


def test_json_logs_one_object_per_line(monkeypatch):
    from twisted.logger import Logger

    monkeypatch.delenv("CARGOBAY_LOG_LEVEL", raising=False)
    monkeypatch.delenv("RUST_LOG", raising=False)
    stream = io.StringIO()
    log = Logger(namespace="test", observer=make_observer("json", "info", stream))
    log.info("pulled {digest} for {subject}", digest="sha256:abc", subject="ci")
    log.debug("hidden")
    [line] = stream.getvalue().splitlines()
    record = json.loads(line)
    assert record["message"] == "pulled sha256:abc for ci"
    assert record["level"] == "info" and record["namespace"] == "test" and record["subject"] == "ci"


def test_logs_follow_twistd_options(tmp_path, monkeypatch):
    # --logfile and daemon mode get cargobay's lines in twistd's log file;
    # --syslog leaves the observer to twistd (ours would write a file).
    from twisted.internet.testing import MemoryReactorClock

    from cargobay.config import parse_config
    from cargobay.server_tap import Options, makeService

    monkeypatch.chdir(tmp_path)
    config = parse_config(f'[auth]\njwt_secret = "{"s" * 32}"\n[cache]\ndirectory = "{tmp_path / "cache"}"\n')
    for parent, observed in (({"nodaemon": True}, True), ({"syslog": True}, False),
                             ({"logfile": str(tmp_path / "x.log"), "nodaemon": True}, True)):
        options = Options()
        options.config = config
        options.parent = parent
        reactor = MemoryReactorClock()
        reactor.callFromThread = lambda f, *a, **kw: f(*a, **kw)  # type: ignore[attr-defined]
        service = makeService(options, reactor)
        assert (service._observer is not None) == observed, parent
    assert (tmp_path / "x.log").exists()


def test_what_does_not_print_is_escaped_in_log_lines():
    from cargobay.logs import printable

    # A lone surrogate lost the whole access and audit line (no log file can
    # encode it); a line break would forge another line.
    assert printable("\ud800\n\r x") == "\\ud800\\n\\r x"
    assert printable("ci-runner é") == "ci-runner é"
    assert printable("a\x1b[31m") == "a\\x1b[31m"
    assert printable("x" * 500, 200) == "x" * 200
    stream = io.StringIO()
    from twisted.logger import Logger

    observer = make_observer("text", "info", stream)
    Logger(namespace="cargobay.access", observer=observer).info("subject={subject}", subject=printable("\ud800\nx"))
    assert "subject=\\ud800\\nx" in stream.getvalue() and stream.getvalue().count("\n") == 1


@pytest.mark.parametrize("subject, in_text", [
    ("ci-bot", "subject=ci-bot repository=a"),
    # A space, a quote, an = or a backslash could pass for more fields.
    ("x repository=secret", 'subject="x repository=secret" repository=a'),
    ('CN=ci, O="corp"', 'subject="CN=ci, O=\\"corp\\"" repository=a'),
    ("", 'subject="" repository=a'),
])
def test_a_field_is_quoted_in_the_text_and_kept_as_it_is_in_json(subject, in_text):
    from twisted.logger import Logger

    from cargobay.logs import field_value

    text, lines = io.StringIO(), io.StringIO()
    for stream, kind in ((text, "text"), (lines, "json")):
        Logger(namespace="cargobay.audit", observer=make_observer(kind, "info", stream)).info(
            "pull subject={subject} repository={name}", subject=field_value(subject), name="a")
    assert in_text in text.getvalue()
    record = json.loads(lines.getvalue())
    assert record["subject"] == subject and in_text in record["message"]
