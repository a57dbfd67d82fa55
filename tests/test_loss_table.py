"""benchmarks/loss_table.py: the settings column reads what a run resolved to."""

from benchmarks import loss_table
from jaxmetric.train.config import TrainConfig


def _result(loss, p1, **config):
    return {"loss": loss, "config": TrainConfig(loss=loss, batch_size=256, **config).to_dict(),
            "precision_at_1": p1, "r_precision": p1 / 2, "map_at_r": p1 / 4,
            "train_seconds": 100.0, "images_per_second": 1000.0}


def test_settings_name_the_optimizer_the_rate_and_the_tuned_values():
    assert loss_table.settings(TrainConfig(loss="triplet", batch_size=256).to_dict()) == \
        "sgd, lr 0.1; margin 0.2"
    # Function defaults are shown where the registry sets nothing; flags win.
    text = loss_table.settings(TrainConfig(loss="cosface", optimizer="adamw", lr=2e-3,
                                           loss_options="scale=16").to_dict())
    assert text == "adamw, lr 0.002; margin 0.35, scale 16; weights at 1 x lr"
    circle = loss_table.settings(TrainConfig(loss="circle", loss_options="gamma=16").to_dict())
    assert circle.endswith("gamma 16") and "gamma 8.37" not in circle
    proxy = loss_table.settings(TrainConfig(loss="proxy_anchor", loss_lr_multiplier=10.0).to_dict())
    assert proxy.endswith("proxies at 10 x lr")


def test_the_table_gives_mean_and_sd_over_seeds():
    rows = loss_table.table([_result("triplet", 0.50), _result("triplet", 0.54),
                             _result("supcon", 0.55)]).splitlines()
    assert rows[0].startswith("| loss | settings | seeds | P@1")
    assert rows[2].startswith("| `triplet` | sgd, lr 0.1; margin 0.2 | 2 | 52.0 ± 2.8 % |")
    assert rows[3].startswith("| `supcon` | sgd, lr 0.1; temperature 0.1 | 1 | 55.0 % |")
