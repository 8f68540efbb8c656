"""Loss by position (lasp.parallel.positions, `python -m lasp.eval positions`): the buckets equal a direct
per-token computation on one process and under SP = 2 on both layouts; bad input is refused up front."""

import json

import pytest
import torch
import torch.nn.functional as F

from lasp.model import LinearLlama, ModelConfig, save_pretrained
from lasp.parallel.positions import buckets, position_losses
from tests.refusals import refuse_all

MODEL = dict(
    vocab_size=64,
    hidden_size=32,
    num_layers=2,
    num_heads=4,
    num_kv_heads=2,
    ffn_hidden_size=64,
    layer_pattern="LS",
    linear_variant="simple_gla",
)
N = 96


def _model() -> LinearLlama:
    torch.manual_seed(0)
    return LinearLlama(ModelConfig(**MODEL)).double().eval()


def _rows(R=3) -> torch.Tensor:
    return torch.randint(0, MODEL["vocab_size"], (R, N + 1), generator=torch.Generator().manual_seed(4))


def _direct(model, rows) -> list[tuple[float, int]]:
    """Per token, by hand: the mean loss of each bucket's positions and their count."""
    with torch.no_grad():
        loss = F.cross_entropy(model(rows[:, :-1]).flatten(0, 1), rows[:, 1:].flatten(), reduction="none")
    loss = loss.view(len(rows), N)
    return [(loss[:, lo - 1 : hi].mean().item(), loss[:, lo - 1 : hi].numel()) for lo, hi in buckets(N)]


def test_buckets_are_log_spaced_from_64():
    assert buckets(64) == [(1, 64)] and buckets(1) == [(1, 1)]
    assert buckets(300) == [(1, 64), (65, 128), (129, 256), (257, 300)]


def test_position_losses_equal_a_direct_computation():
    model, rows = _model(), _rows()
    got = position_losses(model, rows, batch=2)
    for g, (loss, count) in zip(got, _direct(model, rows), strict=True):
        assert g["tokens"] == count and abs(g["loss"] - loss) <= 1e-12 * loss, (g, loss)


def case_positions(layout: str):
    import torch.distributed as dist

    from lasp.parallel.sp import apply_sp

    model, rows = _model(), _rows()
    want = _direct(model, rows)
    apply_sp(model, dist.group.WORLD, layout)
    got = position_losses(model, rows, group=dist.group.WORLD, layout=layout)
    for g, (loss, count) in zip(got, want, strict=True):
        assert g["tokens"] == count and abs(g["loss"] - loss) <= 1e-10 * loss, (g, loss)
    return got


@pytest.mark.parametrize("layout", ["contiguous", "zigzag"])
def test_position_losses_under_sp_equal_one_process(dist_pool, layout):
    a, b = dist_pool(2).run("tests.test_eval:case_positions", layout=layout)
    assert a == b


@pytest.fixture(scope="module")
def export_and_data(tmp_path_factory):
    from lasp.data import prepare

    root = tmp_path_factory.mktemp("eval")
    docs = []
    for i in range(4):  # bytes: 3 documents longer than 2 x 96 tokens, one short
        docs.append(root / f"d{i}.txt")
        docs[-1].write_text(("x = [i * %d for i in range(10)]\n" % i) * (12 if i else 1))
    prepare([str(d) for d in docs], str(root / "data"), progress=False)
    cfg = ModelConfig(**{**MODEL, "vocab_size": 257})
    torch.manual_seed(0)
    save_pretrained(LinearLlama(cfg), str(root / "export"), tokenizer={"name": "byte"})
    return root


def test_the_command_writes_jsonl_and_a_plot(export_and_data, tmp_path, capsys):
    from lasp.eval.__main__ import main

    root = export_and_data
    out, plot = tmp_path / "p.jsonl", tmp_path / "p.png"
    assert (
        main(
            [
                "positions",
                "--checkpoint",
                str(root / "export"),
                "--data",
                str(root / "data"),
                "--split",
                "train",
                "--seq-len",
                "192",
                "--out",
                str(out),
                "--plot",
                str(plot),
            ]
        )
        == 0
    )
    records = [json.loads(line) for line in out.read_text().splitlines()]
    assert [(r["lo"], r["hi"]) for r in records] == buckets(192) and plot.stat().st_size > 0
    assert all(r["rows"] == 3 and r["tokens"] == 3 * (r["hi"] - r["lo"] + 1) for r in records), records


def test_bad_input_is_refused_up_front(export_and_data, tmp_path, capsys, monkeypatch):
    from lasp.eval.__main__ import main

    root = export_and_data
    ck, data = str(root / "export"), str(root / "data")
    monkeypatch.setenv("WORLD_SIZE", "2")  # as torchrun would: the length must split over 2 ranks
    refuse_all(
        main,
        [
            (
                ["positions", "--checkpoint", ck, "--data", data, "--seq-len", "97", "--rows", "0"],
                "--seq-len 97",
                "--rows must be >= 1, got 0",
            ),
            (
                [
                    "positions",
                    "--checkpoint",
                    str(tmp_path / "none"),
                    "--data",
                    str(tmp_path / "nodata"),
                    "--seq-len",
                    "96",
                ],
                f"--checkpoint {tmp_path / 'none'}",
                "--data",
            ),
            (
                ["positions", "--checkpoint", ck, "--data", data, "--split", "train", "--seq-len", "4000"],
                "no document of split 'train' holds --seq-len + 1 = 4001 tokens",
            ),
        ],
        capsys,
        watch=[root, tmp_path],
    )


def test_damaged_data_and_another_tokenizer_are_refused_up_front(export_and_data, tmp_path, capsys):
    """A truncated or same-size-but-changed token file, and a model trained with another tokenizer than the
    data's: exit 2 naming the file (and both hashes), or both tokenizers; nothing read further."""
    import shutil

    from lasp.eval.__main__ import main

    root = export_and_data
    short, changed = tmp_path / "short", tmp_path / "changed"
    for d in (short, changed):
        shutil.copytree(root / "data", d)
    raw = (root / "data" / "train.bin").read_bytes()
    (short / "train.bin").write_bytes(raw[:-3])  # not even a whole number of uint16 tokens
    (changed / "train.bin").write_bytes(raw[2:] + raw[:2])  # the same size, other bytes
    other = tmp_path / "other"  # the same model shape, trained on another tokenizer's ids
    torch.manual_seed(0)
    save_pretrained(
        LinearLlama(ModelConfig(**{**MODEL, "vocab_size": 257})),
        str(other),
        tokenizer={"name": "tokenizer.json", "vocab_size": 257, "eos_id": 0, "sha256": "ab" * 32},
    )
    args = ["--split", "train", "--seq-len", "192"]
    ck = ["positions", "--checkpoint", str(root / "export")]
    refuse_all(
        main,
        [
            (
                [*ck, "--data", str(short), *args],
                f"{short / 'train.bin'}: wrong size, expected {len(raw)} bytes",
                "(truncated, not a whole number of uint16 tokens)",
            ),
            (
                [*ck, "--data", str(changed), *args],
                f"{changed / 'train.bin'}: checksum mismatch: sha256 ",
                "meta.json records "
                f"{json.loads((root / 'data' / 'meta.json').read_text())['splits']['train']['sha256']}",
            ),
            (
                ["positions", "--checkpoint", str(other), "--data", str(root / "data"), *args],
                f"--checkpoint {other} was trained with tokenizer 'tokenizer.json' "
                "(vocab 257, EOS 0, sha256 abababababab",
                f"but --data {root / 'data'} has 'byte' (vocab 257, EOS 256)",
                "name 'tokenizer.json' vs 'byte'",
            ),
        ],
        capsys,
        watch=[root, tmp_path],
    )


# -- passkey ------------------------------------------------------------------------------------------------


class _Copier(torch.nn.Module):
    """A stand-in that reads the key from its context: after the question it predicts the digits that follow
    the needle's "The pass key is "."""

    def __init__(self, tok):
        super().__init__()
        from lasp.eval.passkey import QUESTION

        self.w = torch.nn.Parameter(torch.zeros(1))
        self.tok, self.lead, self.question = tok, tok.encode("The pass key is "), tok.encode(QUESTION)

    def _find(self, seq, pattern, last=False):
        hits = [i for i in range(len(seq) - len(pattern) + 1) if seq[i : i + len(pattern)] == pattern]
        return hits[-1] if last else hits[0]

    def forward(self, tokens, positions):
        seq = tokens[0].tolist()
        at = self._find(seq, self.lead) + len(self.lead)
        answer = self.tok.encode(" " + self.tok.decode(seq[at : at + 5]))
        first = self._find(seq, self.question, last=True) + len(self.question) - 1
        logits = torch.zeros(1, len(seq), 257)
        for i, t in enumerate(answer):
            logits[0, first + i, t] = 1.0
        return logits


class _Noise(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.w = torch.nn.Parameter(torch.zeros(1))

    def forward(self, tokens, positions):
        return torch.randn(1, tokens.shape[1], 257, generator=torch.Generator().manual_seed(int(tokens.sum())))


def test_passkey_copier_scores_one_and_noise_zero():
    from lasp.data.tokenizer import ByteTokenizer
    from lasp.eval.passkey import passkey_accuracy

    tok = ByteTokenizer()
    copied = passkey_accuracy(_Copier(tok), tok, [300, 700], [0, 0.5, 1], trials=3, seed=1)
    assert [r["accuracy"] for r in copied] == [1.0] * 6
    assert all(len(set(r["answers"])) == 3 and all(len(a) == 5 for a in r["answers"]) for r in copied), copied
    noise = passkey_accuracy(_Noise(), tok, [300, 700], [0, 0.5, 1], trials=3, seed=1)
    assert [r["accuracy"] for r in noise] == [0.0] * 6


@pytest.mark.parametrize("depth", [0, 0.25, 0.5, 1])
def test_passkey_prompts_are_the_seeds_and_the_key_sits_at_its_depth(depth):
    from lasp.data.tokenizer import ByteTokenizer
    from lasp.eval.passkey import INTRO, NEEDLE, QUESTION, keys, make_prompt

    tok = ByteTokenizer()
    assert keys(3, 4) == keys(3, 4) != keys(4, 4)
    a, b = (make_prompt(tok, 1000, depth, keys(3, 1)[0]) for _ in range(2))
    assert a == b and len(a.ids) == 1000
    room = 1000 - len(INTRO) - len(NEEDLE.format(key=a.key)) - len(QUESTION)
    assert a.needle_at == len(INTRO) + round(depth * room)
    assert tok.decode(a.ids[a.needle_at : a.needle_at + 22]) == f"The pass key is {a.key}."


def case_passkey(layout: str):
    import torch.distributed as dist

    from lasp.data.tokenizer import ByteTokenizer
    from lasp.eval.passkey import answered, make_prompt
    from lasp.parallel.sp import apply_sp

    torch.manual_seed(0)
    model = LinearLlama(ModelConfig(**{**MODEL, "vocab_size": 257})).double().eval()
    prompts = [make_prompt(ByteTokenizer(), 301, d, "12345") for d in (0, 0.5)]
    want = [answered(model, p) for p in prompts]
    apply_sp(model, dist.group.WORLD, layout)
    got = [answered(model, p, group=dist.group.WORLD, layout=layout) for p in prompts]  # 306 tokens, padded
    assert got == want, (got, want)
    return got


@pytest.mark.parametrize("layout", ["contiguous", "zigzag"])
def test_passkey_under_sp_answers_as_one_process(dist_pool, layout):
    dist_pool(2).run("tests.test_eval:case_passkey", layout=layout)


def test_the_passkey_command_writes_jsonl_and_a_heatmap(export_and_data, tmp_path, capsys):
    from lasp.eval.__main__ import main

    out, plot = tmp_path / "k.jsonl", tmp_path / "k.png"
    assert (
        main(
            [
                "passkey",
                "--checkpoint",
                str(export_and_data / "export"),
                "--lengths",
                "300,500",
                "--depths",
                "0,1",
                "--trials",
                "2",
                "--out",
                str(out),
                "--plot",
                str(plot),
            ]
        )
        == 0
    )
    records = [json.loads(line) for line in out.read_text().splitlines()]
    assert [(r["length"], r["depth"]) for r in records] == [(300, 0), (300, 1), (500, 0), (500, 1)]
    assert all(0 <= r["accuracy"] <= 1 and r["trials"] == 2 for r in records) and plot.stat().st_size > 0


def test_bad_passkey_input_is_refused_up_front(export_and_data, tmp_path, capsys):
    from lasp.eval.__main__ import main

    bare = tmp_path / "bare"
    torch.manual_seed(0)
    save_pretrained(LinearLlama(ModelConfig(**{**MODEL, "vocab_size": 257})), str(bare))  # no tokenizer
    ck = str(export_and_data / "export")
    refuse_all(
        main,
        [
            (
                ["passkey", "--checkpoint", ck, "--lengths", "10,300", "--depths", "0,1.5,-0.1", "--trials", "0"],
                "--lengths 10: a prompt needs at least",
                "--depths: 1.5 is outside [0, 1]",
                "--depths: -0.1 is outside",
                "--trials must be >= 1, got 0",
            ),
            (
                ["passkey", "--checkpoint", str(bare), "--lengths", "1k"],
                f"--checkpoint {bare}: no tokenizer",
                "--lengths must be comma-separated numbers, got '1k'",
            ),
        ],
        capsys,
        watch=[export_and_data, tmp_path],
    )


def test_passkey_lengths_beyond_the_memory_or_the_positions_are_refused(export_and_data, tmp_path, capsys):
    """Checked once the model is read, before any prompt is built: the logits of one forward over the longest
    prompt (and, with float32 RoPE angles, its positions) must fit."""
    from lasp.eval.__main__ import main

    f32 = tmp_path / "f32"
    torch.manual_seed(0)
    save_pretrained(
        LinearLlama(ModelConfig(**{**MODEL, "vocab_size": 257, "float32_norm_rope": True})),
        str(f32),
        tokenizer={"name": "byte"},
    )
    n = 10**15
    refuse_all(
        main,
        [
            (
                ["passkey", "--checkpoint", str(export_and_data / "export"), "--lengths", f"300,{n}"],
                f"--lengths {n}: needs at least 1,091,510,0",
                "GiB are available (MemAvailable): lower --lengths",
            ),
            (
                ["passkey", "--checkpoint", str(f32), "--lengths", f"300,{n}"],
                f"--lengths {n} and the answer need",
                "more than the 16,777,216 this model tells apart",
                f"--lengths {n}: needs at least",
            ),
        ],
        capsys,
        watch=[export_and_data, tmp_path],
    )


def test_passkey_takes_the_tokenizer_an_export_records_and_refuses_ids_past_the_vocabulary(tmp_path, capsys):
    from lasp.data.tokenizer import ByteTokenizer, DataError
    from lasp.eval.__main__ import main
    from lasp.model.hf import to_hf
    from lasp.model.pretrained import write_export_record
    from lasp.train.artifacts import tokenizer_of
    from tests.test_data import hf_tokenizer

    softmax = {**MODEL, "layer_pattern": "SS"}
    hf = tmp_path / "hf"
    to_hf(LinearLlama(ModelConfig(**{**softmax, "vocab_size": 257})), str(hf))
    with pytest.raises(DataError, match="is a directory without a tokenizer.json"):
        tokenizer_of(str(hf))
    write_export_record(hf, "step-00000002", "hf", ByteTokenizer().describe())  # what lasp.export --hf adds
    assert tokenizer_of(str(hf)).describe() == ByteTokenizer().describe()
    small = tmp_path / "small"
    to_hf(LinearLlama(ModelConfig(**{**softmax, "vocab_size": 3})), str(small))
    hf_tokenizer(small / "tokenizer.json", with_eos=False)  # its EOS is appended at id 3: past the 3 ids
    refuse_all(
        main,
        [
            (
                ["passkey", "--checkpoint", str(small), "--lengths", "5000"],
                f"--checkpoint {small}: its "
                "tokenizer 'tokenizer.json' has 4 ids (EOS 3), more than the model's vocabulary of 3",
            )
        ],
        capsys,
        watch=[tmp_path],
    )


# -- lm-evaluation-harness ----------------------------------------------------------------------------------


@pytest.mark.slow
def test_lm_eval_runs_a_local_task_with_the_lasp_model(export_and_data, tmp_path):
    """A local two-example multiple-choice task and a rolling-loglikelihood one through
    lm_eval.simple_evaluate: the loglikelihoods are the model's own summed log-probabilities."""
    lm_eval = pytest.importorskip("lm_eval")
    from lm_eval.tasks import TaskManager

    import lasp.eval.harness  # noqa: F401 - registers the `lasp` model
    from lasp.model.pretrained import from_pretrained
    from lasp.train.artifacts import tokenizer_of

    data = tmp_path / "qa.jsonl"
    data.write_text(
        "\n".join(
            json.dumps(d)
            for d in [
                {"question": "x = [i * 1 for i in", "choices": [" range(10)]", " banana"], "answer": 0},
                {"question": "2 + 2 =", "choices": [" 4", " 5"], "answer": 1},
            ]
        )
        + "\n"
    )
    (tmp_path / "tasks").mkdir()
    common = f"dataset_path: json\ndataset_kwargs:\n  data_files:\n    test: {data}\ntest_split: test\n"
    (tmp_path / "tasks" / "mc.yaml").write_text(
        "task: lasp_local_mc\n" + common + "output_type: multiple_choice\ndoc_to_text: '{{question}}'\n"
        "doc_to_choice: '{{choices}}'\ndoc_to_target: '{{answer}}'\nmetric_list:\n  - metric: acc\n"
    )
    (tmp_path / "tasks" / "ppl.yaml").write_text(
        "task: lasp_local_ppl\n" + common + "output_type: loglikelihood_rolling\ndoc_to_text: '{{question}}'\n"
        "doc_to_target: '{{question}}'\nmetric_list:\n  - metric: word_perplexity\n"
    )
    path = str(export_and_data / "export")
    out = lm_eval.simple_evaluate(
        model="lasp",
        model_args=f"path={path},dtype=float64",
        tasks=["lasp_local_mc", "lasp_local_ppl"],
        log_samples=True,
        task_manager=TaskManager(include_path=str(tmp_path / "tasks")),
    )
    model = from_pretrained(path, dtype=torch.float64)
    tok = tokenizer_of(path)

    def summed(context: list[int], continuation: list[int]) -> float:
        ids = context + continuation
        with torch.no_grad():
            logp = model(torch.tensor([ids[:-1]]))[0].log_softmax(-1)
        n = len(continuation)
        return float(logp[-n:].gather(1, torch.tensor(continuation)[:, None]).sum())

    mc = out["samples"]["lasp_local_mc"]
    assert len(mc) == 2
    for sample in mc:  # each choice: (context, continuation) -> [(loglikelihood, is_greedy)]
        for (context, continuation), resp in zip(sample["arguments"], sample["resps"]):
            want = summed(tok.encode(context), tok.encode(continuation))
            assert abs(float(resp[0][0]) - want) <= 1e-6 * abs(want), (context, continuation, resp, want)
    for sample in out["samples"]["lasp_local_ppl"]:  # the whole text after an EOS
        text = sample["arguments"][0][0]
        want = summed([tok.eos_id], tok.encode(text))
        assert abs(float(sample["resps"][0][0]) - want) <= 1e-6 * abs(want), (text, sample["resps"], want)
    assert 0 <= out["results"]["lasp_local_mc"]["acc,none"] <= 1

    # generate_until: recurrent greedy decoding equals greedy full forwards, cut at the stop string
    from types import SimpleNamespace

    lm = lasp.eval.harness.LaspLM(path=path, dtype="float64")
    got = lm.generate_until([SimpleNamespace(args=("x = [i", {"until": ["]"], "max_gen_toks": 12}))])[0]
    ids, new = tok.encode("x = [i"), []
    with torch.no_grad():
        for _ in range(12):
            nxt = int(model(torch.tensor([ids + new]))[0, -1].argmax())
            if nxt == tok.eos_id:
                break
            new.append(nxt)
            if "]" in tok.decode(new):
                break
    assert got == tok.decode(new).split("]")[0], (got, tok.decode(new))


# -- the retrieval benchmark --------------------------------------------------------------------------------


@pytest.mark.slow
def test_the_retrieval_benchmark_writes_its_rows_and_plot(tmp_path, capsys):
    """Two steps of one model: the rows at 1x, 2x (one process) and 4x, 8x (SP = 2 through torchrun)."""
    from lasp.bench.retrieval import main

    assert (
        main(
            [
                "--out",
                str(tmp_path),
                "--steps",
                "2",
                "--models",
                "hybrid LLLS simple_gla",
                "--seeds",
                "5",
                "--trials",
                "1",
                "--train-len",
                "256",
                "--hidden",
                "32",
                "--layers",
                "4",
            ]
        )
        == 0
    )
    rows = [json.loads(line) for line in (tmp_path / "retrieval.jsonl").read_text().splitlines()]
    assert [(r["length"], r["sp"], r["seed"]) for r in rows] == [(256, 1, 5), (512, 1, 5), (1024, 2, 5), (2048, 2, 5)]
    assert all(0 <= r["accuracy"] <= 1 and len(r["by_depth"]) == 5 for r in rows)
    curve = rows[0]["loss_curve"]
    assert [pt["step"] for pt in curve] == [1, 2] and rows[0]["final_loss"] == curve[-1]["loss"]
    assert all(len(pt["mixer_out"]) == 4 and pt["stream"] > 0 and pt["grad_norm_max"] > 0 for pt in curve)
    probe = rows[0]["probe"]
    assert len(probe["loss_without_mixer"]) == 4 and probe["loss"] > 0 and probe["grad_norm"]["lm_head"] > 0
    assert len(probe["grad_norm"]["mixer"]) == len(probe["grad_norm"]["mlp"]) == 4
    assert (tmp_path / "hybrid-LLLS-simple_gla" / "seed-5" / "config.json").is_file()
    assert (tmp_path / "retrieval.png").stat().st_size > 0 and "| hybrid LLLS simple_gla |" in capsys.readouterr().out


def test_the_retrieval_benchmark_gathers_runs_of_a_few_models_each(tmp_path, capsys):
    """--collect: several runs' rows in one JSONL, plot and table, the seeds of a model as the mean and range
    of its accuracy; a model trained from the same seed in two runs is refused."""
    from lasp.bench.retrieval import main

    def run(d, *models, seed=0, acc=(1.0, 0.5, 0.25, 0.0)):
        rows = [
            {"model": m, "seed": seed, "params": 10, "train_len": 8, "length": n, "accuracy": a}
            | {"train_seconds": 1.0 + seed, "final_loss": 0.5 + seed}
            for m in models
            for n, a in zip((8, 16, 32, 64), acc)
        ]
        (tmp_path / d).mkdir()
        (tmp_path / d / "retrieval.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
        return rows

    both = run("a", "softmax") + run("b", "lightning", "simple_gla") + run("s1", "softmax", seed=1, acc=(0, 0, 0, 1))
    dirs = ",".join(str(tmp_path / d) for d in ("a", "b", "s1"))
    assert main(["--out", str(tmp_path / "all"), "--collect", dirs]) == 0
    assert [json.loads(line) for line in (tmp_path / "all" / "retrieval.jsonl").read_text().splitlines()] == both
    out = capsys.readouterr().out
    assert "| softmax | 10 | 2 | 2 | 1.00 (0.50-1.50) | 0.50 (0.00-1.00) | 0.25 (0.00-0.50) | 0.12 (0.00-0.25)" in out
    assert "| simple_gla | 10 | 1 | 1 | 0.50 | 1.00 | 0.50 | 0.25 | 0.00 |" in out
    assert out.index("| lightning |") < out.index("| simple_gla |") < out.index("| softmax |")  # MODELS' order
    assert (tmp_path / "all" / "retrieval.png").stat().st_size > 0
    run("c", "softmax", seed=1)
    refuse_all(
        main,
        [
            (
                ["--out", str(tmp_path / "o"), "--collect", f"{dirs},{tmp_path / 'c'},{tmp_path / 'x'}"],
                "model 'softmax' seed 1 is in",
                "x/retrieval.jsonl does not exist",
            )
        ],
        capsys,
        watch=[tmp_path],
    )


def test_the_retrieval_benchmark_refuses_bad_input(tmp_path, capsys):
    from lasp.bench.retrieval import main

    refuse_all(
        main,
        [
            (
                ["--out", str(tmp_path / "o"), "--models", "mamba", "--steps", "0", "--train-len", "100"]
                + ["--seeds", "1,x,1,1234"],
                "--models: unknown 'mamba'",
                "--seeds: 'x' is not a non-negative integer",
                "--seeds: 1 is given twice",
                "--seeds: 1234 is the evaluation's seed",
                "--steps must be >= 1, got 0",
                "--train-len must be at least 251",
            )
        ],
        capsys,
        watch=[tmp_path],
    )
