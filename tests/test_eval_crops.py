"""evaluate.py with more spatial crops per test clip (--spatial-crops 3) and with a
reference-project LMDB read through its list files (--list, --train-list).

The classifier is a randomly initialised finetuning checkpoint written here, so no
finetuning run is needed: what is tested is how evaluation reads and averages."""

import json
from pathlib import Path

import pytest
import torch

import evaluate
from cstp.backbone_io import FINETUNE_FORMAT
from cstp.classifier import build_classifier
from pipelines.clip_loader import ClipLoader, ClipLoaderSettings
from pipelines.clip_plan import clip_config_from, num_test_clips
from tests.lmdb_fixtures import coded_video, write_lmdb
from tests.test_clip_pipeline import REF_VIDEOS, build_reference_layout_lmdb

CLASSES = ["alpha", "beta", "gamma"]
CLIP = {"frames": 4, "stride": 2, "crop_size": 24, "test_short_side": 32}
LENGTHS = [9 + 2 * i for i in range(9)]          # 9..25 frames: 1 to 4 test clips (span 6)


@pytest.fixture(autouse=True)
def one_torch_thread():
    """The tiny model runs no faster on more threads, and a shared machine makes their
    spinning cost seconds; restored afterwards."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def tiny_db(tmp_path_factory):
    names = [f"{CLASSES[i % 3]}/v{i:03d}" for i in range(9)]
    return str(write_lmdb(tmp_path_factory.mktemp("db") / "tiny.lmdb", [coded_video(n, 32, 48) for n in LENGTHS],
                          names=names, labels=[i % 3 for i in range(9)], classes=CLASSES))


def write_checkpoint(path: Path, classes, clip=CLIP, seed=0) -> Path:
    torch.manual_seed(seed)
    model = build_classifier(0.125, len(classes))
    torch.save({"format": FINETUNE_FORMAT, "version": 1, "width": 0.125, "num_classes": len(classes),
                "classes": list(classes), "clip": dict(clip), "model": model.state_dict()}, path)
    return path


def evaluate_json(*args) -> dict:
    out = Path(args[args.index("--json") + 1])
    assert evaluate.main([*args, "--no-progress", "--num-threads", "1", "--batch-size", "4"]) == 0
    return json.loads(out.read_text())


def test_three_crops_average_every_clip_and_crop_of_a_video(tmp_path, tiny_db):
    ckpt = write_checkpoint(tmp_path / "ft.pt", CLASSES)
    one = evaluate_json("--checkpoint", str(ckpt), "--data", tiny_db, "--json", str(tmp_path / "one.json"))
    three = evaluate_json("--checkpoint", str(ckpt), "--data", tiny_db, "--json", str(tmp_path / "three.json"),
                          "--spatial-crops", "3")
    clips = sum(num_test_clips(n, clip_config_from(CLIP)) for n in LENGTHS)
    assert (one["spatial_crops"], one["test_items"]) == (1, clips)
    assert (three["spatial_crops"], three["test_items"]) == (3, 3 * clips)
    assert one["videos"] == three["videos"] == 9
    assert sum(map(sum, three["confusion_matrix"])) == 9

    # The report's predictions are the argmax of the mean logits over all clips x crops
    # of each video, computed here item by item from the loader's batches.
    raw = torch.load(ckpt, weights_only=True)
    model = build_classifier(0.125, 3)
    model.load_state_dict(raw["model"])
    model.eval()
    cfg = clip_config_from({**CLIP, "spatial_crops": 3})
    loader = ClipLoader(tiny_db, "test", cfg, ClipLoaderSettings(batch_size=4, num_threads=1))
    per_video: dict[int, list] = {}
    with torch.no_grad():
        for batch in loader:
            logits = model.head(model.backbone(batch["clip"]))
            for i in torch.nonzero(batch["valid"]).flatten().tolist():
                per_video.setdefault(int(batch["video_index"][i]), []).append(
                    ((int(batch["clip_index"][i]), int(batch["crop_index"][i])), logits[i]))
    loader.close()
    for video, rows in per_video.items():
        assert sorted(key for key, _ in rows) == [(c, k) for c in range(num_test_clips(LENGTHS[video], cfg))
                                                  for k in range(3)]
    means = torch.stack([torch.stack([l for _, l in per_video[v]]).mean(0) for v in range(9)])
    confusion = torch.zeros(3, 3, dtype=torch.long)
    for video, prediction in enumerate(means.argmax(1).tolist()):
        confusion[video % 3, prediction] += 1
    assert three["confusion_matrix"] == confusion.tolist()
    assert three["top1"] == pytest.approx(confusion.diag().sum().item() / 9)

    # the same averaging through evaluate.video_outputs (what the report is built from)
    loader = ClipLoader(tiny_db, "test", cfg, ClipLoaderSettings(batch_size=4, num_threads=1))
    _, mean_logits, labels, seen, items = evaluate.video_outputs(model.backbone, model.head, loader,
                                                                 torch.device("cpu"), False, "test")
    loader.close()
    assert items == 3 * clips and seen.all() and labels.tolist() == [v % 3 for v in range(9)]
    assert torch.allclose(mean_logits, means, atol=1e-5)


def test_a_reference_lmdb_is_evaluated_through_its_list_files(tmp_path):
    db = tmp_path / "ref.lmdb"
    build_reference_layout_lmdb(db)
    test_list, train_list = tmp_path / "testlist.txt", tmp_path / "trainlist.txt"
    test_list.write_text("bowling/b1.avi 1 20\narchery/a2.avi 0 14\ncycling/c1.avi 2 17\n")
    train_list.write_text("archery/a1.avi 0 9\nbowling/b2.avi 1 11\ncycling/c2.avi 2 8\nbowling/b1.avi 1 20\n")
    clip = {"frames": 4, "stride": 4, "crop_size": 32, "test_short_side": 48}
    ckpt = write_checkpoint(tmp_path / "ft.pt", ["archery", "bowling", "cycling"], clip)
    report = evaluate_json("--checkpoint", str(ckpt), "--data", str(db), "--list", str(test_list),
                           "--train-data", str(db), "--train-list", str(train_list), "--json",
                           str(tmp_path / "r.json"))
    assert report["videos"] == 3 and report["list"] == str(test_list)
    # the list's labels: one test video per class, in the list's class numbering
    assert [sum(row) for row in report["confusion_matrix"]] == [1, 1, 1]
    assert set(report["per_class"]) == {"archery", "bowling", "cycling"}
    assert report["retrieval_gallery"].endswith("4 videos)")
    assert report["retrieval"]["r50"] == 1.0       # the whole gallery, which holds every class
    cfg = clip_config_from(clip)
    assert report["test_items"] == sum(num_test_clips(REF_VIDEOS[n], cfg)
                                       for n in ("bowling/b1", "archery/a2", "cycling/c1"))
    # a --train-list without --train-data is refused with a message
    assert evaluate.main(["--checkpoint", str(ckpt), "--data", str(db), "--train-list", str(train_list),
                          "--json", str(tmp_path / "x.json")]) == 2
