"""Fetches the public upstream files the data layer reads, and checks them against a manifest.

Terms:
  manifest: ``MANIFEST``, one ``ManifestEntry`` per file: its path inside the data directory, the
    public URL it comes from (pinned to a commit, so the bytes cannot change under us), its sha256,
    size and license. The layout is that of the project's shared data folder (see ``data_dir.py``).
  dataset: the group an entry belongs to (one of ``DATASETS``); ``only=`` selects groups.

Only byte copies of public files are listed. Files the shared folder derives from them
(``asdiv/ASDiv.jsonl``, the Codex notebook outputs, the golden tokenization) are not downloaded.

A download streams into a temp file beside its target, is checked for size and sha256, and only then
moved over the target with ``os.replace``: a corrupted or cut-off download never creates or replaces
the target. Standard library only, so ``specialize download`` works before anything heavy imports.
"""
import dataclasses
import difflib
import hashlib
import http.client
import os
import pathlib
import tempfile
import time
import urllib.error
import urllib.parse
import urllib.request
from typing import Callable, Iterable, Optional, Union

from specialize_jax.errors import ConfigError

DATASETS = ("gsm8k", "multiarith", "svamp", "asdiv", "addsub", "singleeq", "bbh", "prompts",
            "tokenizer", "teacher_outputs")
RAW_GITHUB_URL = "https://raw.githubusercontent.com/{repo}/{commit}/{path}"
T5_VOCAB_URL = ("https://storage.googleapis.com/t5-data/vocabs/cc_all.32000.100extra/"
                "sentencepiece.model")
# Statuses of a briefly unwell server or proxy; other HTTP errors are final (retrying cannot help).
RETRYABLE_HTTP_STATUSES = frozenset({408, 425, 429, 500, 502, 503, 504})
CHUNK_BYTES = 1 << 16
USER_AGENT = "specialize_jax-download (python-urllib)"
PALM_SVAMP_DIR = "teacher_outputs/distilling_step_by_step_palm_svamp"

PathLike = Union[str, os.PathLike]
Progress = Callable[[str], None]


@dataclasses.dataclass(frozen=True)
class ManifestEntry:
  """One public file: where it goes, where it comes from, and the exact bytes it must have."""
  dataset: str
  relative_path: str  # inside the data directory, '/'-separated
  url: str
  sha256: str
  size_bytes: int
  license: str


@dataclasses.dataclass(frozen=True)
class _Source:
  """A public GitHub repository pinned to the commit the shared data folder was copied from."""
  repo: str
  commit: str
  license: str


GSM8K = _Source("openai/grade-school-math", "3101c7d5072418e28b9008a6636bde82a006892c",
                "MIT (c) 2021 OpenAI")
FU2023 = _Source("FranxYao/FlanT5-CoT-Specialization", "a8ffd51afa4f88b9a8fe160c093fb891af5a1cc7",
                 "MIT")
# The MultiArith dev split lives in FranxYao/chain-of-thought-hub; this fork is the pinned copy.
COT_HUB_FORK = _Source("lu-wang-dl/chain-of-thought-hub",
                       "d52bae89527daca8a354f97561438f12725df780", "MIT")
ZERO_SHOT_COT = _Source("kojima-takeshi188/zero_shot_cot",
                        "5ef330fcdeec0cd26aee27943504f91f8ec1c33c",
                        "none stated by the repository (data from its original authors)")
SVAMP = _Source("arkilpatel/SVAMP", "689d7ccac74b9983a2ac7cc3b264f441b99e7c53", "MIT")
ASDIV = _Source("chaochun/nlu-asdiv-dataset", "883f90a9a65bf00304ba8f37423910fe743abc47",
                "CC BY-NC 4.0 (non-commercial)")
REASONING_TEACHER = _Source("itsnamgyu/reasoning-teacher",
                            "a2ca4d28d3bbabbd77106b76d06885d1a5eac0d9", "MIT")
BBH = _Source("suzgunmirac/BIG-Bench-Hard", "9ee07bd481feebf959a6b59d61ea57bdcf30964d", "MIT")
# google-research/distilling-step-by-step ships SVAMP's PaLM rationales only inside datasets.zip.
# This fork has them unzipped: a third-party copy (SOURCES.md section 4d). Its datasets.zip blob is
# upstream's, but its unzipped files were never compared with the zip. The manifest renames the
# JSON-lines files `svamp_{train,test}.json` to `.jsonl`.
DSS_FORK = _Source("maxh119Z/distilling-step-by-step1", "5b76a471c46c61f45114eab6621ffdff12d676b6",
                   "Apache-2.0 (third-party fork copy of google-research/distilling-step-by-step)")


def _github(dataset: str, relative_path: str, source: _Source, upstream_path: str, sha256: str,
            size_bytes: int) -> ManifestEntry:
  url = RAW_GITHUB_URL.format(repo=source.repo, commit=source.commit,
                              path=urllib.parse.quote(upstream_path))
  return ManifestEntry(dataset, relative_path, url, sha256, size_bytes, source.license)


# sha256 and sizes come from the byte copies in the shared data folder, whose git blob ids equal the
# upstream blobs at the pinned commits; tests/test_download.py checks them against that folder.
MANIFEST: tuple[ManifestEntry, ...] = (
    _github("gsm8k", "gsm8k/train.jsonl", GSM8K, "grade_school_math/data/train.jsonl",
            "17f347dc51477c50d4efb83959dbb7c56297aba886e5544ee2aaed3024813465", 4166206),
    _github("gsm8k", "gsm8k/test.jsonl", GSM8K, "grade_school_math/data/test.jsonl",
            "3730d312f6e3440559ace48831e51066acaca737f6eabec99bccb9e4b3c39d14", 749738),
    _github("gsm8k", "gsm8k/example_model_solutions.jsonl",
            GSM8K, "grade_school_math/data/example_model_solutions.jsonl",
            "4bc62db838f8418365d51c627bd66294cbdca9fb7f01519cb13f0dce8c51580b", 2563513),
    _github("gsm8k", "gsm8k/validation_index.npy", FU2023, "lib_prompt/validation_index.npy",
            "0222a43bdbaa69c8840461512e4e2bb51ca4376cb03e4596dc19d005ff281de9", 1728),
    _github("multiarith", "multiarith/MultiArith.json",
            ZERO_SHOT_COT, "dataset/MultiArith/MultiArith.json",
            "dc9db1b6cc68b1ecc2dec830d15aaf8c9a0932aa31d5ffce88ef3628179d36f4", 254012),
    _github("multiarith", "multiarith/validation_index.npy", COT_HUB_FORK,
            "research/complexity_based_prompting/MultiArith/data/validation_index.npy",
            "11828c4146561c1adabb9e7ed043441bd2faf7b3818b15b64350461c10635e0d", 1728),
    _github("svamp", "svamp/SVAMP.json", SVAMP, "SVAMP.json",
            "5be77703a6d891ae476d7c082787ad361392aa02453b132516cdd5f4e7934e3e", 339970),
    _github("asdiv", "asdiv/ASDiv.xml", ASDIV, "dataset/ASDiv.xml",
            "ef8904068482919ac48c8eeaaf6df344b8a308ba66d048c2d4d87eab82dc4929", 947401),
    _github("addsub", "addsub/AddSub.json", ZERO_SHOT_COT, "dataset/AddSub/AddSub.json",
            "21930fa90385c72b5a15f4b9a4dda27276b889ae9ff44285505cdd9fa0a20df8", 131373),
    _github("singleeq", "singleeq/questions.json", ZERO_SHOT_COT, "dataset/SingleEq/questions.json",
            "051507bd2b489c257057b485774a83d2710c23a4bc0f4a58e1822ae2773ef05e", 137870),
    _github("bbh", "bbh/bbh/boolean_expressions.json", BBH, "bbh/boolean_expressions.json",
            "ea6c754ec005e2d3f2d085d349a740f593b5764f32ea4638ffed4cfc0061b12a", 17172),
    _github("bbh", "bbh/cot-prompts/boolean_expressions.txt",
            BBH, "cot-prompts/boolean_expressions.txt",
            "685affba97425cdf3549d5d313ba876caed2fa7c8a4cf1ea7549faf22179609d", 1891),
    _github("bbh", "bbh/bbh/causal_judgement.json", BBH, "bbh/causal_judgement.json",
            "6e8bca44dd402008ed41c07a3d0a1d5e7b03db7001a7e002fcdf4c60985ea081", 202943),
    _github("bbh", "bbh/cot-prompts/causal_judgement.txt", BBH, "cot-prompts/causal_judgement.txt",
            "14377e36cccb084b7d0fe73988d08696f7675d712b02d3ae1f5f7f12c77028ea", 3763),
    _github("bbh", "bbh/bbh/date_understanding.json", BBH, "bbh/date_understanding.json",
            "0148d4ac5fca05b2f82373e5fef7208e15363b9c6079493034d77b3dab496bf5", 61760),
    _github("bbh", "bbh/cot-prompts/date_understanding.txt",
            BBH, "cot-prompts/date_understanding.txt",
            "a0a13c392f689a1828f5f6ffb9dee3d44483794490da5d92f0e2a723787b1cfb", 1277),
    _github("bbh", "bbh/bbh/disambiguation_qa.json", BBH, "bbh/disambiguation_qa.json",
            "cf06df9ebf911b883671cb1b35d3fbd1a1c306b19b9e9a012407e596c85fe8c6", 85255),
    _github("bbh", "bbh/cot-prompts/disambiguation_qa.txt",
            BBH, "cot-prompts/disambiguation_qa.txt",
            "794fd259297972a4c963a5d13a84dc221edde460de27fa5d8fd64299a2001597", 3678),
    _github("bbh", "bbh/bbh/dyck_languages.json", BBH, "bbh/dyck_languages.json",
            "3f9badedf15c2be1ce53d94fdf016299bb30ba231ef087ab9f51a7ed6d0bdc25", 43814),
    _github("bbh", "bbh/cot-prompts/dyck_languages.txt", BBH, "cot-prompts/dyck_languages.txt",
            "b0836603007ec659ed685458647fb6d7543543304e7aca909b995d0c3aff22b2", 2515),
    _github("bbh", "bbh/bbh/formal_fallacies.json", BBH, "bbh/formal_fallacies.json",
            "4c1adb664821157faade1d4153685403afcc02648f3c180a608a18f17f589629", 145562),
    _github("bbh", "bbh/cot-prompts/formal_fallacies.txt", BBH, "cot-prompts/formal_fallacies.txt",
            "10c06cc362520e9b8dddfc4861e263ff668d228a52d958dcc69f09f1d224935a", 4587),
    _github("bbh", "bbh/bbh/geometric_shapes.json", BBH, "bbh/geometric_shapes.json",
            "07be68a124420caa2ebc0b2c858ad79fc55c5c8806170e496e1e17ebfb11f31c", 77242),
    _github("bbh", "bbh/cot-prompts/geometric_shapes.txt", BBH, "cot-prompts/geometric_shapes.txt",
            "f36d9893507eb518d84f388fb677dc0226c74a98873700de0b556548d65d3f76", 4941),
    _github("bbh", "bbh/bbh/hyperbaton.json", BBH, "bbh/hyperbaton.json",
            "b6d7f55c75f5d02f2987a4f3123802dfa093872089a56a334144aae8a7264fdc", 44706),
    _github("bbh", "bbh/cot-prompts/hyperbaton.txt", BBH, "cot-prompts/hyperbaton.txt",
            "19898af91c35cb26bbdf5fdb6f6fb17e138677250332e2994005625ffb50b261", 3224),
    _github("bbh", "bbh/bbh/logical_deduction_five_objects.json",
            BBH, "bbh/logical_deduction_five_objects.json",
            "d2df31394b903b7f0e085d42a69572a092987856eac076799017d70ef266fa8f", 155477),
    _github("bbh", "bbh/cot-prompts/logical_deduction_five_objects.txt",
            BBH, "cot-prompts/logical_deduction_five_objects.txt",
            "4ed65246c0c1c4b0b4053d784181892b842bce19cf4358c976f34b1a434ef034", 2615),
    _github("bbh", "bbh/bbh/logical_deduction_seven_objects.json",
            BBH, "bbh/logical_deduction_seven_objects.json",
            "2896c7e3482eea318dd37bcc370d24ec3cc91e8374c1784287b5dbd38a529e33", 198404),
    _github("bbh", "bbh/cot-prompts/logical_deduction_seven_objects.txt",
            BBH, "cot-prompts/logical_deduction_seven_objects.txt",
            "4ed65246c0c1c4b0b4053d784181892b842bce19cf4358c976f34b1a434ef034", 2615),
    _github("bbh", "bbh/bbh/logical_deduction_three_objects.json",
            BBH, "bbh/logical_deduction_three_objects.json",
            "e590fae72e3a6041fbd23bd8ff6b74baf44ca563f6ba40a041c55e7b867c1681", 112213),
    _github("bbh", "bbh/cot-prompts/logical_deduction_three_objects.txt",
            BBH, "cot-prompts/logical_deduction_three_objects.txt",
            "4ed65246c0c1c4b0b4053d784181892b842bce19cf4358c976f34b1a434ef034", 2615),
    _github("bbh", "bbh/bbh/movie_recommendation.json", BBH, "bbh/movie_recommendation.json",
            "a8b53a87ee21a865b7248e694f388a9b8f7cf6b839b11d44796a2dd3fc088983", 57684),
    _github("bbh", "bbh/cot-prompts/movie_recommendation.txt",
            BBH, "cot-prompts/movie_recommendation.txt",
            "cdf765634713b057091d541b4773dd2c998f81447b0bd8564ae70be4cdf3f5d0", 2231),
    _github("bbh", "bbh/bbh/multistep_arithmetic_two.json",
            BBH, "bbh/multistep_arithmetic_two.json",
            "c9d5a6433c9b78256422a15c78463949c8bec8d85607aa28b52d7234ad4a8595", 18325),
    _github("bbh", "bbh/cot-prompts/multistep_arithmetic_two.txt",
            BBH, "cot-prompts/multistep_arithmetic_two.txt",
            "a546e0b7cde09037bc144ae5c32c9cf78dafdfac929ae76e2051b2dd8f3671ce", 2496),
    _github("bbh", "bbh/bbh/navigate.json", BBH, "bbh/navigate.json",
            "b7944dfd3c81da5c4815bd75b00d6fa3c64140823498e78ed496f4c3d36f7f0d", 55163),
    _github("bbh", "bbh/cot-prompts/navigate.txt", BBH, "cot-prompts/navigate.txt",
            "dc2fd733f1867b8c79685f15b83746064534a94bf73468341c2a9dd335be22fc", 2257),
    _github("bbh", "bbh/bbh/object_counting.json", BBH, "bbh/object_counting.json",
            "8acef14dbbdd40d2326ef7755750b6b5fe919fef06276af1bab3f1c297f022ff", 35890),
    _github("bbh", "bbh/cot-prompts/object_counting.txt", BBH, "cot-prompts/object_counting.txt",
            "e51ffc03fd713a13a379a6c938a523dfc1c2f384f2a8447bd7a12d4458f18833", 1528),
    _github("bbh", "bbh/bbh/penguins_in_a_table.json", BBH, "bbh/penguins_in_a_table.json",
            "bb87ee449698eee51215e025a453b1bcb2f5e6589c2063b2c79e68b8f0655228", 74516),
    _github("bbh", "bbh/cot-prompts/penguins_in_a_table.txt",
            BBH, "cot-prompts/penguins_in_a_table.txt",
            "33be137e76c2a6af0bbacd17a8e7a92801886c0202a45e35ea9c2a88c1f26d51", 2496),
    _github("bbh", "bbh/bbh/reasoning_about_colored_objects.json",
            BBH, "bbh/reasoning_about_colored_objects.json",
            "0a8850cf95166020fce7a78244026ceedd7ea839302471512b4f8744e85a6a49", 98694),
    _github("bbh", "bbh/cot-prompts/reasoning_about_colored_objects.txt",
            BBH, "cot-prompts/reasoning_about_colored_objects.txt",
            "e4ea02d05b13e8ed9ccc3b0d878bc4df4c5a6fb76c65d39d48d6244f7ff0b9d5", 2405),
    _github("bbh", "bbh/bbh/ruin_names.json", BBH, "bbh/ruin_names.json",
            "b6f723aef2bafdd4c7bfc3c7e0329c7e8a8279391a609969c8ed76c9319f5f7f", 53178),
    _github("bbh", "bbh/cot-prompts/ruin_names.txt", BBH, "cot-prompts/ruin_names.txt",
            "731446c6c66bb5258677af1417b599a6a5539be6d74a5afc02cf7a716444ea54", 3591),
    _github("bbh", "bbh/bbh/salient_translation_error_detection.json",
            BBH, "bbh/salient_translation_error_detection.json",
            "becf3eb8dd53c821a555ecd5c1334ecd93eb25f980e63be963c518e7138de5da", 286443),
    _github("bbh", "bbh/cot-prompts/salient_translation_error_detection.txt",
            BBH, "cot-prompts/salient_translation_error_detection.txt",
            "2c8367f75092202cc507fdbfaaf037b1c1eed38e91289084439738367f0785f7", 6251),
    _github("bbh", "bbh/bbh/snarks.json", BBH, "bbh/snarks.json",
            "54a0661fe2de06167645a4965e6bcf963c4ba307e76262a7c750998b0e3d0d0e", 42646),
    _github("bbh", "bbh/cot-prompts/snarks.txt", BBH, "cot-prompts/snarks.txt",
            "35084a2a0b86bc4008ab206b838c0b97dd425897dd72198137c3cefc499c0960", 3224),
    _github("bbh", "bbh/bbh/sports_understanding.json", BBH, "bbh/sports_understanding.json",
            "63ca262858f6176864515cd8cf53cdaa40839ebecc155b726d77930855d167bf", 28617),
    _github("bbh", "bbh/cot-prompts/sports_understanding.txt",
            BBH, "cot-prompts/sports_understanding.txt",
            "2058a9bed717a6edb8ca2f815e88851436a4ee14c8b0d504ccf464865c6d0295", 931),
    _github("bbh", "bbh/bbh/temporal_sequences.json", BBH, "bbh/temporal_sequences.json",
            "92a1189faaa84aacc4c405aaa13f13f48c2992eb884772eedb622505252baef5", 148176),
    _github("bbh", "bbh/cot-prompts/temporal_sequences.txt",
            BBH, "cot-prompts/temporal_sequences.txt",
            "3e7ebf1e20abe3e219dc6514dcb7474d82db1b2c66acc733cd30af2e9e0b64b0", 3133),
    _github("bbh", "bbh/bbh/tracking_shuffled_objects_five_objects.json",
            BBH, "bbh/tracking_shuffled_objects_five_objects.json",
            "2063a46a4fb484236ed4310523606543a3e1dd4a4dc34eda65d407910ece25a5", 169722),
    _github("bbh", "bbh/cot-prompts/tracking_shuffled_objects_five_objects.txt",
            BBH, "cot-prompts/tracking_shuffled_objects_five_objects.txt",
            "2ef54cb2a72052adc3484a76209cb6a6535f194d677e79bcec2e2e71cf3768af", 2714),
    _github("bbh", "bbh/bbh/tracking_shuffled_objects_seven_objects.json",
            BBH, "bbh/tracking_shuffled_objects_seven_objects.json",
            "b59fd05b850c37cf57cb514ae1e6975c00b1638ade2291722056b2af3c54084d", 214906),
    _github("bbh", "bbh/cot-prompts/tracking_shuffled_objects_seven_objects.txt",
            BBH, "cot-prompts/tracking_shuffled_objects_seven_objects.txt",
            "2ef54cb2a72052adc3484a76209cb6a6535f194d677e79bcec2e2e71cf3768af", 2714),
    _github("bbh", "bbh/bbh/tracking_shuffled_objects_three_objects.json",
            BBH, "bbh/tracking_shuffled_objects_three_objects.json",
            "546cc7bf10c6a01a6a4c17ae28a4966485f21f29fd5d111f37858ec78e354f6b", 128736),
    _github("bbh", "bbh/cot-prompts/tracking_shuffled_objects_three_objects.txt",
            BBH, "cot-prompts/tracking_shuffled_objects_three_objects.txt",
            "2ef54cb2a72052adc3484a76209cb6a6535f194d677e79bcec2e2e71cf3768af", 2714),
    _github("bbh", "bbh/bbh/web_of_lies.json", BBH, "bbh/web_of_lies.json",
            "3e60323f8514a107fdb4edf35f8832a9171c5a09c0eaa47823559de905e8ab8b", 52964),
    _github("bbh", "bbh/cot-prompts/web_of_lies.txt", BBH, "cot-prompts/web_of_lies.txt",
            "c8025ca65ab7f0897c243504c863bda043d04b6e873777536743e94023c929d0", 3055),
    _github("bbh", "bbh/bbh/word_sorting.json", BBH, "bbh/word_sorting.json",
            "2a6132d2c99f00d0d2eb1113ac6b4a918bd969d863c48749210d969713db8d43", 66300),
    _github("bbh", "bbh/cot-prompts/word_sorting.txt", BBH, "cot-prompts/word_sorting.txt",
            "a2cdbcfe23abaa97b9787f7c03dbf49b1cfd0ff9e63197b7884bb5cd5a096ca6", 2274),
    _github("prompts", "prompts/fu2023_lib_prompt/prompt_complex.txt",
            FU2023, "lib_prompt/prompt_complex.txt",
            "d20a8061b484da2d93d10152727c5c137f7bec76f5f4f9e1c94f17cf33051aee", 8464),
    _github("prompts", "prompts/fu2023_lib_prompt/prompt_direct.txt",
            FU2023, "lib_prompt/prompt_direct.txt",
            "1d3d2cce95ee7ab59ed618f66217dd7c6a07b677c7cfb17ddbab832945e15a1a", 1248),
    _github("prompts", "prompts/fu2023_lib_prompt/prompt_original.txt",
            FU2023, "lib_prompt/prompt_original.txt",
            "db8c84b10707a16cc2f61e192e1e55452393510470a3d5790db86188a42ae4e0", 2374),
    _github("prompts", "prompts/fu2023_lib_prompt/prompt_random.txt",
            FU2023, "lib_prompt/prompt_random.txt",
            "0163f82793ba27a2d3ad2b7d665f984ff72d3ac8b893d68c62731c2f848060f3", 3656),
    _github("prompts", "prompts/fu2023_lib_prompt/prompt_simple.txt",
            FU2023, "lib_prompt/prompt_simple.txt",
            "e47a4425475eed38cc0e6de602340dde83db57d192d83021ba8cc358affb655b", 3168),
    _github("prompts", "prompts/fu2023_lib_prompt/prompt_simple_4_cases.txt",
            FU2023, "lib_prompt/prompt_simple_4_cases.txt",
            "941647bc7ab3cb54cbd4cf791410aa84c106a703a8fad624aea8524d8ec204c6", 1557),
    _github("prompts", "prompts/reasoning_teacher_few_shot_cot_prompts.json",
            REASONING_TEACHER, "data/few_shot_cot_prompts.json",
            "72bb973daf1ab1217ec5bc1cc95a8be8ab78d05ff42356a3176341d848956d19", 25357),
    _github("teacher_outputs", f"{PALM_SVAMP_DIR}/svamp_train.jsonl",
            DSS_FORK, "datasets/svamp/svamp_train.json",
            "641fc0f69864e1376fc2e29675affd15fa641f3b40279dcd6a595f3780f4e721", 163561),
    _github("teacher_outputs", f"{PALM_SVAMP_DIR}/svamp_test.jsonl",
            DSS_FORK, "datasets/svamp/svamp_test.json",
            "b73cba2c53b1e9b1c8aa512a8928c12d0524d1acba560f8c526756185044054c", 41338),
    _github("teacher_outputs", f"{PALM_SVAMP_DIR}/llm_train_CoT_0.json",
            DSS_FORK, "datasets/svamp/llm/train_CoT_0.json",
            "9aa813b5653131e53bfe0477fa2cb3f90fb3d1b7a5226433218cb7b85998f094", 205881),
    _github("teacher_outputs", f"{PALM_SVAMP_DIR}/llm_train_CoT_1.json",
            DSS_FORK, "datasets/svamp/llm/train_CoT_1.json",
            "db0131252436d0487ff8642d94abad23636c080258da60097d5c6f15b1e32639", 122946),
    _github("teacher_outputs", f"{PALM_SVAMP_DIR}/llm_test_CoT_0.json",
            DSS_FORK, "datasets/svamp/llm/test_CoT_0.json",
            "fd536719c09b0cc97bfeee5775b212f8e4541ffe012bcd99c893a99e7e46df37", 82516),
    # Google's T5 / FlanT5 SentencePiece vocabulary (32,000 pieces), Apache-2.0.
    ManifestEntry("tokenizer", "tokenizer/t5_spiece.model", T5_VOCAB_URL,
                  "d60acb128cf7b7f2536e8f38a5b18a05535c9e14c7a355904270e15b0945ea86", 791656,
                  "Apache-2.0"),
)


@dataclasses.dataclass(frozen=True)
class FileProblem:
  """A file that is missing or not the manifest's bytes, or a download that failed, and why."""
  dataset: str
  relative_path: str
  reason: str


@dataclasses.dataclass(frozen=True)
class DownloadSummary:
  """What ``download`` did, file by file; ``exit_code`` is what the CLI should exit with."""
  data_dir: pathlib.Path
  downloaded: tuple[str, ...]
  already_present: tuple[str, ...]  # checksum verified, not fetched again
  failed: tuple[FileProblem, ...]

  @property
  def ok(self) -> bool:
    return not self.failed

  @property
  def exit_code(self) -> int:
    return 0 if self.ok else 1


class _RetryableError(Exception):
  """A failure that may pass on its own: a dropped connection, a timeout, an HTTP 5xx."""


class _FinalError(Exception):
  """A failure that retrying cannot fix: wrong bytes, an HTTP 404."""


def select_entries(only: Union[None, str, Iterable[str]] = None) -> tuple[ManifestEntry, ...]:
  """Manifest entries of the named datasets (all when ``only`` is None; "a,b" strings allowed)."""
  if only is None:
    return MANIFEST
  names = only.split(",") if isinstance(only, str) else list(only)
  names = [name.strip() for name in names if name.strip()]
  if not names:
    raise ConfigError(f"only={only!r} names no dataset; choose from {', '.join(DATASETS)}.")
  for name in names:
    if name not in DATASETS:
      close = difflib.get_close_matches(name, DATASETS, n=3)
      hint = f" Did you mean {' or '.join(close)}?" if close else ""
      raise ConfigError(f"Unknown dataset {name!r} in --only={only!r}.{hint} "
                        f"Known datasets: {', '.join(DATASETS)}.")
  return tuple(entry for entry in MANIFEST if entry.dataset in names)


def sha256_of_file(path: PathLike) -> str:
  digest = hashlib.sha256()
  with open(path, "rb") as f:
    for chunk in iter(lambda: f.read(CHUNK_BYTES), b""):
      digest.update(chunk)
  return digest.hexdigest()


def _problem_with(entry: ManifestEntry, path: pathlib.Path) -> Optional[str]:
  """Why ``path`` is not ``entry``'s file, or None when it is (size first: it costs no read)."""
  if not path.is_file():
    return "missing"
  size_bytes = path.stat().st_size
  if size_bytes != entry.size_bytes:
    return f"size {size_bytes} bytes, expected {entry.size_bytes}"
  actual = sha256_of_file(path)
  if actual != entry.sha256:
    return f"sha256 {actual}, expected {entry.sha256}"
  return None


def verify(data_dir: PathLike, only: Union[None, str, Iterable[str]] = None) -> list[FileProblem]:
  """Every selected file that is missing or differs from the manifest (empty list: all good)."""
  root = pathlib.Path(data_dir).expanduser()
  problems = []
  for entry in select_entries(only):
    reason = _problem_with(entry, root / entry.relative_path)
    if reason is not None:
      problems.append(FileProblem(entry.dataset, entry.relative_path, reason))
  return problems


def format_problems(problems: Iterable[FileProblem], data_dir: PathLike) -> str:
  """An error message for ``verify``'s findings, ending with the command that fixes them."""
  problems = list(problems)
  if not problems:
    return f"All data files in {data_dir} match the manifest."
  datasets = sorted({p.dataset for p in problems}, key=DATASETS.index)
  lines = [f"{len(problems)} data file(s) missing or corrupt in {data_dir}:"]
  lines += [f"  {p.relative_path}: {p.reason}" for p in problems]
  lines.append(f"Fetch them with: specialize download --data_dir={data_dir} "
               f"--only={','.join(datasets)}")
  return "\n".join(lines)


def _entry_url(entry: ManifestEntry, base_url_override: Optional[str]) -> str:
  if base_url_override is None:
    return entry.url
  return f"{base_url_override.rstrip('/')}/{urllib.parse.quote(entry.relative_path)}"


def _open(url: str, timeout_s: float) -> http.client.HTTPResponse:
  request = urllib.request.Request(url, headers={"User-Agent": USER_AGENT})
  try:
    return urllib.request.urlopen(request, timeout=timeout_s)  # pylint: disable=consider-using-with
  except urllib.error.HTTPError as e:
    e.close()
    message = f"HTTP {e.code} {e.reason} from {url}"
    if e.code in RETRYABLE_HTTP_STATUSES:
      raise _RetryableError(message) from e
    raise _FinalError(message) from e
  except (OSError, http.client.HTTPException) as e:  # URLError, timeouts, refused, reset
    raise _RetryableError(f"cannot connect to {url}: {type(e).__name__}: {e}") from e


def _fetch_verified(entry: ManifestEntry, url: str, target: pathlib.Path, timeout_s: float) -> None:
  """Streams ``url`` into a temp file beside ``target``; moves it there only if it is ``entry``."""
  target.parent.mkdir(parents=True, exist_ok=True)
  fd, temp_name = tempfile.mkstemp(dir=target.parent, prefix=f".{target.name}.", suffix=".part")
  temp = pathlib.Path(temp_name)
  try:
    digest = hashlib.sha256()
    received_bytes = 0
    with os.fdopen(fd, "wb") as out, _open(url, timeout_s) as response:
      while True:
        try:
          chunk = response.read(CHUNK_BYTES)
        except (OSError, http.client.HTTPException) as e:
          raise _RetryableError(f"connection failed after {received_bytes} of {entry.size_bytes} "
                                f"bytes from {url}: {type(e).__name__}: {e}") from e
        if not chunk:
          break
        received_bytes += len(chunk)
        if received_bytes > entry.size_bytes:  # stop reading: it cannot be the file anymore
          raise _FinalError(f"wrong file: {url} sent more than the expected {entry.size_bytes} "
                            "bytes; check the URL or --base_url")
        digest.update(chunk)
        out.write(chunk)
    actual = digest.hexdigest()
    if received_bytes < entry.size_bytes:
      # http.client returns a short body quietly when the server closes early: a dropped connection.
      raise _RetryableError(f"truncated: connection dropped after {received_bytes} of "
                            f"{entry.size_bytes} bytes from {url} (sha256 of the partial file "
                            f"{actual}, expected {entry.sha256})")
    if actual != entry.sha256:
      raise _FinalError(f"checksum mismatch: sha256 {actual}, expected {entry.sha256} "
                        f"({received_bytes} bytes from {url}); the target was left untouched")
    os.replace(temp, target)
  finally:
    temp.unlink(missing_ok=True)  # gone already after a successful os.replace


def _fetch_with_retries(entry: ManifestEntry, url: str, target: pathlib.Path, timeout_s: float,
                        retries: int, retry_backoff_s: float, progress: Progress) -> Optional[str]:
  """None on success, else the reason the last attempt failed."""
  attempt = 1
  while True:
    try:
      _fetch_verified(entry, url, target, timeout_s)
      return None
    except _FinalError as e:
      return str(e)
    except _RetryableError as e:
      if attempt > retries:
        return f"{e} (gave up after {attempt} attempt(s))"
      delay_s = retry_backoff_s * 2 ** (attempt - 1)
      progress(f"  {entry.relative_path}: {e}; retry {attempt}/{retries} in {delay_s:.2f} s")
      time.sleep(delay_s)
      attempt += 1


def download(data_dir: PathLike,
             only: Union[None, str, Iterable[str]] = None,
             force: bool = False,
             base_url_override: Optional[str] = None,
             timeout_s: float = 60,
             retries: int = 3,
             progress: Optional[Progress] = print,
             retry_backoff_s: float = 1.0) -> DownloadSummary:
  """Fetches the selected manifest files into ``data_dir``, skipping those already verified.

  Args:
    data_dir: the data directory (created if needed); see ``data_dir.data_dir()``.
    only: dataset names (``DATASETS``), as an iterable or a "gsm8k,bbh" string; None means all.
    force: fetch even files that already match (a bad download still never replaces them).
    base_url_override: a mirror serving the data directory's layout: each file is fetched from
      ``{base_url_override}/{relative_path}`` instead of its public URL.
    timeout_s: socket timeout per connect and per read, in seconds.
    retries: extra attempts after a dropped connection, timeout or HTTP 5xx/429, with exponential
      backoff from ``retry_backoff_s``. Wrong bytes and other HTTP errors are not retried.
    progress: called with one line per file (and per retry); None for silence.

  Returns:
    The summary; its ``exit_code`` is 1 if any file failed.
  """
  if retries < 0:
    raise ConfigError(f"retries={retries} must be >= 0.")
  if base_url_override is not None and not base_url_override.strip():
    raise ConfigError("base_url_override is empty; pass a URL such as http://mirror/data or None.")
  progress = progress or (lambda _: None)
  root = pathlib.Path(data_dir).expanduser()
  entries = select_entries(only)
  total_mb = sum(entry.size_bytes for entry in entries) / 1e6
  datasets = sorted({entry.dataset for entry in entries}, key=DATASETS.index)
  progress(f"{len(entries)} file(s), {total_mb:.1f} MB ({', '.join(datasets)}) into {root}")
  downloaded, already_present, failed = [], [], []
  for index, entry in enumerate(entries, start=1):
    prefix = f"[{index}/{len(entries)}] {entry.relative_path}"
    target = root / entry.relative_path
    if target.exists():
      reason = _problem_with(entry, target)
      if reason is None and not force:
        already_present.append(entry.relative_path)
        progress(f"{prefix}: already present, sha256 ok")
        continue
      if reason is not None:
        progress(f"{prefix}: existing file is bad ({reason}); downloading again")
    url = _entry_url(entry, base_url_override)
    start_s = time.monotonic()
    reason = _fetch_with_retries(entry, url, target, timeout_s, retries, retry_backoff_s, progress)
    if reason is None:
      elapsed_s = max(time.monotonic() - start_s, 1e-6)
      downloaded.append(entry.relative_path)
      progress(f"{prefix}: downloaded {entry.size_bytes / 1e6:.2f} MB in {elapsed_s:.2f} s "
               f"({entry.size_bytes / 1e6 / elapsed_s:.2f} MB/s)")
    else:
      failed.append(FileProblem(entry.dataset, entry.relative_path, reason))
      progress(f"{prefix}: FAILED: {reason}")
  return DownloadSummary(root, tuple(downloaded), tuple(already_present), tuple(failed))


def format_summary(summary: DownloadSummary) -> str:
  """A few lines for the end of ``specialize download``: counts, each failure, and what to do."""
  lines = [f"Downloaded {len(summary.downloaded)} file(s); {len(summary.already_present)} already "
           f"present (sha256 verified, skipped); {len(summary.failed)} failed. "
           f"Data directory: {summary.data_dir}"]
  if summary.failed:
    lines.append("Failed:")
    lines += [f"  {p.relative_path}: {p.reason}" for p in summary.failed]
    datasets = sorted({p.dataset for p in summary.failed}, key=DATASETS.index)
    lines.append("Targets of failed files were not created or changed. Check the network (or "
                 "--base_url), then rerun: specialize download "
                 f"--data_dir={summary.data_dir} --only={','.join(datasets)}")
  return "\n".join(lines)
