"""Bridge configuration: validation names the bad key, secrets stay out of files, stages are wired right."""

from __future__ import annotations

import json
import re
import shlex
import sys
import tomllib
from pathlib import Path

import pytest
from click.testing import CliRunner
from supervisor.options import ServerOptions

from sipbridge.bridge import RUN_JANUS_SECRET_ENV, BridgeConfigError, bridge_stages, missing_secrets, parse_bridge
from sipbridge.cli import cli
from sipbridge.supervise import render_config

EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "bridge-local.toml"


def example() -> dict:
    return tomllib.loads(EXAMPLE.read_text())


@pytest.mark.parametrize(
    "mutate, message",
    [
        (lambda d: d["room"].pop("url"), "room.url is required"),
        (lambda d: d["room"].update(capture="video"), "room.capture must be one of raw, encoded"),
        (lambda d: d["media"]["to_sip"].update(audio_codec="amr"), "media.to_sip.audio_codec must be one of"),
        (lambda d: d["media"]["to_sip"].update(width=641), "media.to_sip.width must be an even number"),
        (lambda d: d["media"]["to_sip"].update(preset="placebo"), "media.to_sip.preset must be one of"),
        (lambda d: d["sip"].update(route=[{"match": "^sip:a@"}]), "sip.route is for inbound calls"),
        (lambda d: d["sip"].update(dtmf="inband"), "sip.dtmf must be one of"),
        (lambda d: d["sip"].update(media_timeout_s=-1), "sip.media_timeout_s must be 0 (never) or more"),
        (lambda d: (d["sip"].pop("call"),
                    d["sip"].update(inbound=True, accept_from=".*", route=[{"match": "(", "vars": {}}])),
         "sip.route[1].match is not a valid regular expression"),
        (lambda d: (d["sip"].pop("call"), d["sip"].update(inbound=True, accept_from=".*", route=[{"vars": {}}])),
         "sip.route[1].match is required"),
        (lambda d: (d["sip"].pop("call"),
                    d["sip"].update(inbound=True, accept_from=".*", route=[{"match": ".", "vars": {"room": 7}}])),
         "sip.route[1].vars must be a table of strings"),
        (lambda d: d["media"]["to_sip"].update(fps="30"), "media.to_sip.fps must be int"),
        (lambda d: d["sip"].update(call="echo@host"), "sip.call must be a sip: URI"),
        (lambda d: d["sip"].update(inbound=True), "exactly one of sip.call"),
        (lambda d: d["sip"].update(secret="hunter2"), "sip.secret must name an environment variable"),
        (lambda d: d["sip"].update(register="digest"), "needs sip.proxy and sip.secret"),
        (lambda d: d["layout"].update(mode="mosaic"), "layout.mode must be one of"),
        (lambda d: d.update(room_side={"split": "5x5"}), "room_side.split must be COLSxROWS"),
        (lambda d: d["janus"].update(colour="red"), "unknown key janus.colour"),
        (lambda d: d["janus"].update(url="http://x"), "janus.url must be a ws://"),
        # No accept-all default: an inbound bridge says whom it answers.
        (lambda d: (d["sip"].pop("call"), d["sip"].update(inbound=True)), "sip.accept_from is required"),
        (lambda d: d["sip"].update(accept_from=".*"), "sip.accept_from is for inbound calls"),
        (lambda d: d["sip"].update(media_timeout_s=float("nan")), "sip.media_timeout_s must be a finite number"),
        (lambda d: d["sip"].update(media_timeout_s=float("inf")), "sip.media_timeout_s must be a finite number"),
        (lambda d: d["room"].update(url="http://x/" + "a" * 300_000), "room.url is 300009 characters long; at most"),
        (lambda d: d["room"].update(vars={f"v{i}": "x" for i in range(100)}), "room.vars has 100 entries; at most"),
        (lambda d: d["layout"].update(participants=["p" * 5000]), "layout.participants[1] is 5000 characters"),
        (lambda d: d.pop("room"), "missing section [room]"),
        (lambda d: d.update(room="x"), "[room] must be a table"),
        (lambda d: d["room"].update(page_video="blurred"), "room.page_video must be one of shown, hidden"),
        (lambda d: d.update(processes={"nice": -21}), "processes.nice must be from -20 to 19, not -21"),
        (lambda d: d.update(processes={"nice": "high"}), "processes.nice must be int"),
    ],
)
def test_errors_name_the_bad_key(mutate, message: str) -> None:
    data = example()
    mutate(data)
    with pytest.raises(BridgeConfigError, match=re.escape(message)):
        parse_bridge(data)


def test_stages_are_wired_in_both_directions(tmp_path: Path) -> None:
    data = example()
    data["room_side"] = {"split": "2x2"}
    specs = {s.name: s for s in bridge_stages(parse_bridge(data), tmp_path)}
    assert specs["room-decoder"].inputs == ["browser"]
    assert specs["room-transformer"].inputs == ["room-decoder"]
    assert specs["sip-encoder"].inputs == ["room-transformer"]
    assert specs["janus"].inputs == ["sip-encoder"]
    assert specs["sip-decoder"].inputs == ["janus"]
    assert specs["browser"].inputs == ["sip-transformer"]
    assert "split:2x2" in specs["sip-transformer"].args
    assert specs["sip-decoder"].args == ["--audio-rate", "48000"]
    assert specs["browser"].args[specs["browser"].args.index("--video-tracks") + 1] == "4"
    assert "compose:grid:640x480:4" in specs["room-transformer"].args
    assert "resample:8000" in specs["room-transformer"].args
    assert specs["janus-server"].priority == 10


def test_without_a_split_the_sip_decoder_feeds_the_browser(tmp_path: Path) -> None:
    specs = {s.name: s for s in bridge_stages(parse_bridge(example()), tmp_path)}
    assert "sip-transformer" not in specs
    assert specs["browser"].inputs == ["sip-decoder"]


def test_secrets_come_from_the_environment_and_never_reach_the_config_file(tmp_path: Path) -> None:
    data = example()
    data["sip"].update(register="digest", proxy="sip:127.0.0.1:5070", authuser="bridge", secret="env:SB_TEST_SECRET")
    cfg = parse_bridge(data)
    assert missing_secrets(cfg, {}) == ["SB_TEST_SECRET"]
    assert missing_secrets(cfg, {"SB_TEST_SECRET": "hunter2"}) == []
    specs = bridge_stages(cfg, tmp_path)
    conf = render_config(specs, tmp_path)
    assert "hunter2" not in conf and "SB_TEST_SECRET" not in conf and "--secret" not in conf
    # Only the janus stage asks for it, by name, from the broker; supervisord never sees it. (With janus.start, the
    # Janus API secret generated for the run goes to Janus and the janus stage the same way.)
    assert {s.name: s.secrets for s in specs if s.secrets} == {
        "janus": {"SIPBRIDGE_STAGE_JANUS_SECRET": "SB_TEST_SECRET",
                  "SIPBRIDGE_STAGE_JANUS_API_SECRET": RUN_JANUS_SECRET_ENV},
        "janus-server": {"SIPBRIDGE_JANUS_API_SECRET": RUN_JANUS_SECRET_ENV}}
    janus_command = next(line for line in conf.splitlines() if line.startswith("command=") and "stage janus" in line)
    assert "-m sipbridge.secretenv" in janus_command and "--program janus" in janus_command
    assert sum("sipbridge.secretenv" in line for line in conf.splitlines()) == 2


def test_a_bridge_is_live_every_program_restarted_whatever_its_exit_code(tmp_path: Path) -> None:
    specs = bridge_stages(parse_bridge(example()), tmp_path)
    assert all(s.live for s in specs)
    conf = render_config(specs, tmp_path)
    assert conf.count("autorestart=true") == len(specs) and "autorestart=unexpected" not in conf
    assert conf.count('SIPBRIDGE_LIVE="1"') == len(specs)


def test_processes_nice_puts_every_program_of_the_call_behind_nice(tmp_path: Path) -> None:
    data = example()
    data["processes"] = {"nice": -7}
    specs = bridge_stages(parse_bridge(data), tmp_path)
    assert {s.nice for s in specs} == {-7}
    commands = [line for line in render_config(specs, tmp_path).splitlines() if line.startswith("command=")]
    assert len(commands) == len(specs) and all(re.match(r"command=\S*/nice -n -7 ", c) for c in commands), commands
    assert "nice -n" not in render_config(bridge_stages(parse_bridge(example()), tmp_path), tmp_path)


def test_room_url_with_a_query_string_gets_the_room_joined_with_an_ampersand() -> None:
    from stages.browser.recipes import load_recipe

    recipe = load_recipe("local-room", {"room_url": "http://127.0.0.1:8480/app?a=%41", "room": "1234"})
    assert recipe.start_url() == "http://127.0.0.1:8480/app?a=%41&room=1234&codec=h264"
    plain = load_recipe("local-room", {"room_url": "http://127.0.0.1:8480/", "room": "1234"})
    assert plain.start_url() == "http://127.0.0.1:8480/?room=1234&codec=h264"


def test_examples_all_parse(tmp_path: Path) -> None:
    for path in sorted(EXAMPLE.parent.glob("bridge-*.toml")):
        bridge_stages(parse_bridge(tomllib.loads(path.read_text())), tmp_path)


def test_up_refuses_a_bad_bridge_file_with_the_key_named(tmp_path: Path) -> None:
    bad = tmp_path / "bridge.toml"
    bad.write_text(EXAMPLE.read_text().replace('audio_codec = "pcmu"', 'audio_codec = "gsm"'))
    result = CliRunner().invoke(cli, ["up", str(bad), "--run-dir", str(tmp_path / "run")])
    assert result.exit_code == 1
    assert "media.to_sip.audio_codec must be one of pcmu, pcma, g722, opus, not 'gsm'" in result.output
    secret = tmp_path / "secret.toml"
    secret.write_text(
        EXAMPLE.read_text().replace(
            'register = "guest"', 'register = "digest"\nproxy = "sip:127.0.0.1"\nsecret = "env:SB_UNSET_SECRET_VAR"'
        )
    )
    result = CliRunner().invoke(cli, ["up", str(secret), "--run-dir", str(tmp_path / "run")])
    assert result.exit_code == 1 and "SB_UNSET_SECRET_VAR not set" in result.output


def test_inbound_routes_reach_the_browser_through_supervisord_unchanged(tmp_path: Path, monkeypatch) -> None:
    """Routes become the browser's --join-on-call and --route options; what supervisord itself parses out of the
    rendered configuration is exactly that argv, % signs (URL escapes, regexes) included."""
    data = example()
    data["room"]["vars"] = {"room": "50%off"}
    data["sip"].pop("call")
    data["sip"].update(inbound=True, accept_from=".*", route=[{"match": "^sip:a%20b@", "vars": {"room": "7"}},
                                                             {"match": "."}])
    specs = bridge_stages(parse_bridge(data), tmp_path)
    (tmp_path / "logs").mkdir()
    conf = tmp_path / "supervisord.conf"
    conf.write_text(render_config(specs, tmp_path))
    monkeypatch.setenv("SIPBRIDGE_PYTHON", sys.executable)
    options = ServerOptions()
    options.configfile = str(conf)
    options.process_config(do_usage=False)
    commands = {p.name: p.command for g in options.process_group_configs for p in g.process_configs}
    argv = shlex.split(commands["browser"])
    assert argv[argv.index("--var") + 1] == "room=50%off"
    assert "--join-on-call" in argv
    routes = [json.loads(argv[i + 1]) for i, a in enumerate(argv) if a == "--route"]
    assert routes == [{"match": "^sip:a%20b@", "vars": {"room": "7"}}, {"match": ".", "vars": {}}]


def test_speaker_layout_shows_the_active_speaker(tmp_path: Path) -> None:
    data = example()
    data["layout"] = {"mode": "speaker"}
    specs = {s.name: s for s in bridge_stages(parse_bridge(data), tmp_path)}
    assert "compose:speaker:640x480" in specs["room-transformer"].args


def test_readme_intro_names_every_sip_codec() -> None:
    """The README's first paragraph lists every codec a bridge file may choose for SIP (it once left VP8 and Opus
    out)."""
    from sipbridge.bridge import AUDIO_CODECS, VIDEO_CODECS

    readme = (EXAMPLE.parents[1] / "README.md").read_text()
    intro = readme.split("\n\n")[1]
    shown = {"h264": "H.264", "vp8": "VP8", "pcmu": "PCMU", "pcma": "PCMA", "g722": "G.722", "opus": "Opus"}
    for codec in (*VIDEO_CODECS, *AUDIO_CODECS):
        if codec != "none":
            assert shown[codec] in intro.split("on SIP")[0].split("room;")[-1], codec
