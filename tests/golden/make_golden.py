"""Golden values from the authors' TensorFlow code, for tests/test_golden.py (issue 10).

Run by hand, never in CI (CI only reads the files this writes):

    git clone https://github.com/yetigurbuz/ccp-dml /tmp/authors
    git -C /tmp/authors checkout 204b22c8fcbb0a4723151e8df37f423af40bb249
    python3.11 -m venv /tmp/tfenv
    /tmp/tfenv/bin/pip install "tensorflow==2.15.*" "numpy<2" yacs iopath six pillow scikit-learn \
        "opencv-python-headless<4.11"
    /tmp/tfenv/bin/python tests/golden/make_golden.py --authors /tmp/authors

(Measured with tensorflow 2.15.1 / Keras 2.15 on CPU, Python 3.11.) It imports the authors'
`framework` package and calls their functions and loss classes on small seeded inputs; nothing
here re-implements a formula of theirs. Their optional dependencies (yacs, iopath, cv2, ...) are
installed, not stubbed. Output, beside this file:
- authors.npz: inputs and the authors' outputs (float32 unless a key ends in _f64);
- authors_sampler.json: batches drawn by their m-per-class sampler, and the label set;
- authors_meta.json: the commit, the library versions and the facts the script asserted.

Facts about their code that the script asserts (so that they are documented as theirs):
- n(x) = x / max(1, ||x||) with the identity gradient inside the unit ball;
- the CCP loss is 0.1 * pair form + 1.0 * proxy form;
- C1 (`original_contrastive`) subtracts eps = 1e-5 from every positive term that stays positive:
  the value drops by 1e-5 * (#positive pairs) / (#anchors) and the gradients are unchanged;
- their SoftTriple with the shipped computation head (samples as anchors, Euclidean distance)
  cannot run a batch of 32 with 10 centres per class; it runs with proxies as anchors and cosine;
- their SoftTriple regulariser, sqrt(relu(2 - 2<c, c'>)) on raw centres, has NaN gradients on both
  centres of any same-class pair with <c, c'> >= 1 (only possible outside the unit ball);
- Keras' float64 Adam sees lr and the betas rounded to float32 (they live in float32 variables);
- their sampler visits every class once per round; per class, no image repeats before the class
  is exhausted within a cycle of ceil(mean images per class / m) rounds (the queues restart every
  cycle, so across cycles images do repeat early: counted in authors_meta.json); their k-center
  candidates come from a OnePerClass stream built the same way with m = 1;
- their cross-batch memory stores a batch before its loss (the batch meets its own copy), and its
  term is on from batch start_at + batches_in_mem - 1.
Determinism: two runs write identical files (seeded numpy, tf.random.set_seed for the sampler).
"""
import argparse
import collections
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import numpy as np

AUTHORS_COMMIT = "204b22c8fcbb0a4723151e8df37f423af40bb249"
HERE = Path(__file__).resolve().parent

# PAPER.md §4 table: each dataset's loss parameters, in the authors' config names
DATASET_PARAMS = {
    "cub": {"original_contrastive": {"margin": 0.5},
            "contrastive": {"pos_margin": 0.0, "neg_margin": 0.3841},
            "triplet": {"margin": 0.0961},
            "multi_similarity": {"alpha_margin": 2.0, "beta_margin": 40.0, "lambda_margin": 0.5}},
    "cars": {"original_contrastive": {"margin": 0.5},
             "contrastive": {"pos_margin": 0.2652, "neg_margin": 0.5409},
             "triplet": {"margin": 0.1190},
             "multi_similarity": {"alpha_margin": 14.35, "beta_margin": 75.83, "lambda_margin": 0.66}},
    "inshop": {"original_contrastive": {"margin": 0.5},
               "contrastive": {"pos_margin": 0.2858, "neg_margin": 0.5130},
               "triplet": {"margin": 0.0451},
               "multi_similarity": {"alpha_margin": 8.49, "beta_margin": 57.38, "lambda_margin": 0.41}},
    "sop": {"original_contrastive": {"margin": 0.5},
            "contrastive": {"pos_margin": 0.2858, "neg_margin": 0.5130},
            "triplet": {"margin": 0.0451},
            "multi_similarity": {"alpha_margin": 2.0, "beta_margin": 40.0, "lambda_margin": 0.5}},
}
LOSS_KEYS = {"original_contrastive": "c1", "contrastive": "c2", "triplet": "triplet", "multi_similarity": "ms"}
# PAPER.md §4: SoftTriple (lambda, gamma, tau, delta); their config names it
# (lambda_softmax, gamma_entropy, tau_reg, delta_margin) and uses softmax(s / gamma_entropy)
SOFTTRIPLE_PARAMS = {"cub_inshop": (20.0, 0.1, 0.2, 0.01), "cars": (17.69, 19.18, 0.0669, 0.3588),
                     "sop": (100.0, 47.9, 0.2, 0.3145),
                     "shipped": (78.02, 58.95, 0.3754, 0.4307)}  # their soft_triple config defaults

# --------------------------------------------------------------------------- the authors' package


def import_authors(path: Path):
    """Import their `framework` from a checkout of AUTHORS_COMMIT; return (tf, framework)."""
    head = subprocess.run(["git", "-C", str(path), "rev-parse", "HEAD"], capture_output=True, text=True).stdout.strip()
    if head != AUTHORS_COMMIT:
        raise SystemExit(f"{path} is at commit {head or '?'}, expected {AUTHORS_COMMIT}")
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    sys.path.insert(0, str(path))
    import tensorflow as tf
    import framework  # registers every loss's config node in their default config
    return tf, framework


def fake_model(tf, dim: int, num_classes: int):
    """The attributes their losses read from a model: a Keras `arch` whose layer 'EmbeddingHead'
    knows the embedding size (their makeProxy adds the proxies to it), and bookkeeping lists."""
    class EmbeddingHead(tf.keras.layers.Layer):
        def __init__(self):
            super().__init__(name="EmbeddingHead")
            self._embedding_size = dim

        def call(self, x):
            return x

    class Model:
        pass

    inputs = tf.keras.Input((dim,))
    model = Model()
    model.arch = tf.keras.Model(inputs, EmbeddingHead()(inputs))
    model.learning_rate_multipliers, model.training_callbacks, model.gradient_transformers = {}, [], []
    model.num_classes = num_classes
    return model


def config(framework, **head):
    """Their default config merged with their shipped configs/dml_small.yaml, then `head` overrides
    of loss.computation_head."""
    cfg = framework.configs.default.cfg.clone()
    cfg.merge_from_file(str(Path(framework.__file__).parent.parent / "configs" / "dml_small.yaml"))
    for key, value in head.items():
        cfg.loss.computation_head[key] = value
    return cfg


def proxy_variable(model):
    return [w for w in model.arch.weights if "proxy_embedding" in w.name][0]


def value_and_grads(tf, loss_obj, x, y, variables):
    """Their loss on embeddings x (n, d) with labels y, and its gradients w.r.t. x and `variables`."""
    x = tf.Variable(x)
    with tf.GradientTape() as tape:
        value = loss_obj.call(tf.constant(y.reshape(-1, 1).astype(np.int32)), x)
    grads = tape.gradient(value, [x, *variables])
    return np.float32(value.numpy()), [None if g is None else g.numpy() for g in grads]

# --------------------------------------------------------------------------- input conditioning


def mixed_norm_rows(rng, n: int, d: int, low=(0.3, 0.9), high=(1.1, 2.5)) -> np.ndarray:
    """Rows alternating between norms in `low` and in `high`: inside and outside the unit ball by
    default, never on the sphere where n(x) has no derivative (PAPER.md §3)."""
    u = rng.normal(size=(n, d))
    u /= np.linalg.norm(u, axis=1, keepdims=True)
    r = np.where(np.arange(n) % 2 == 0, rng.uniform(*low, n), rng.uniform(*high, n))
    return (u * r[:, None]).astype(np.float32)


def unit_ball_image(x: np.ndarray) -> np.ndarray:
    # only to keep the inputs away from the losses' kinks (data conditioning, not a reference value)
    x = x.astype(np.float64)
    return x / np.maximum(1.0, np.linalg.norm(x, axis=1, keepdims=True))


def far_from_kinks(x, y, ref, ref_y, pair_form: bool, gap: float = 2e-4) -> bool:
    """No hinge of C1, C2 or triplet (any dataset's margins) within `gap` of its kink, so float32
    (theirs) and float64 (ours) agree on which terms are active."""
    z, r = unit_ball_image(x), unit_ball_image(ref)
    s = z @ r.T
    d = np.sqrt(np.maximum(((z[:, None] - r[None]) ** 2).sum(-1), 0))
    same = y[:, None] == ref_y[None, :]
    if pair_form:
        np.fill_diagonal(same, False)
        not_self = ~np.eye(len(y), dtype=bool)
    else:
        not_self = np.ones_like(same)
    pos, neg = same & not_self, ~(y[:, None] == ref_y[None, :])
    hinges = [(1 - s)[pos], (s - 0.5)[neg]]
    for params in DATASET_PARAMS.values():
        c2 = params["contrastive"]
        hinges += [(d - c2["pos_margin"])[pos], (c2["neg_margin"] - d)[neg]]
        m = params["triplet"]["margin"]
        hinges.append((d[:, :, None] - d[:, None, :] + m)[pos[:, :, None] & neg[:, None, :]])
    return all(np.all(np.abs(h) > gap) for h in hinges)

# --------------------------------------------------------------------------- n(x) (PAPER.md §3)


def golden_normalize(tf, framework, rng, out):
    x = mixed_norm_rows(rng, 10, 5)
    w = rng.normal(size=x.shape).astype(np.float32)
    layer = framework.layers.L2Normalization()
    xv = tf.Variable(x)
    with tf.GradientTape() as tape:
        y = layer(xv)
        s = tf.reduce_sum(y * w)
    grad = tape.gradient(s, xv).numpy()
    inside = np.linalg.norm(x, axis=1) < 1
    assert np.array_equal(y.numpy()[inside], x[inside]) and np.array_equal(grad[inside], w[inside])
    out.update(normalize_x=x, normalize_upstream=w, normalize_value=y.numpy(), normalize_grad=grad)

# --------------------------------------------------------------------------- the four losses and CCP (§2, §4)


def loss_object(tf, framework, model, loss_name, params, **attributes):
    """Their loss class `loss_name` (as their trainer builds it) with `params`, then `attributes` set on it."""
    cfg = config(framework)
    for key, value in params.items():
        cfg.loss[loss_name][key] = value
    obj = getattr(framework.losses, loss_name)(model=model, cfg=cfg)
    for key, value in attributes.items():
        setattr(obj, key, value)
    return obj


def golden_losses(tf, framework, rng, out, facts):
    n_classes, per_class, d = 5, 3, 8  # proxies: 5 classes x 3; the batch holds classes 0..3 only
    y = np.repeat(np.arange(4), 3)
    proxy_y = np.tile(np.arange(n_classes), per_class)  # their layout is K-major: row k*C + c is class c
    for seed in range(1000):
        r = np.random.default_rng([int(rng.integers(1 << 31)), seed])
        x = mixed_norm_rows(r, len(y), d)
        proxies = mixed_norm_rows(r, n_classes * per_class, d, low=(0.5, 0.95))
        if far_from_kinks(x, y, x, y, True) and far_from_kinks(x, y, proxies, proxy_y, False):
            break
    else:
        raise SystemExit("no input far enough from the losses' kinks")
    out.update(loss_x=x, loss_y=y, loss_proxies=proxies, loss_proxy_y=proxy_y)
    facts["loss_inputs_redraws"] = seed
    from framework.utilities import proxy_utils

    for dataset, all_params in DATASET_PARAMS.items():
        for loss_name, params in all_params.items():
            key = f"{dataset}_{LOSS_KEYS[loss_name]}"
            # pair form: a model without proxies, the batch against itself
            pair = loss_object(tf, framework, fake_model(tf, d, n_classes), loss_name, params)
            pair_value, (pair_gx,) = value_and_grads(tf, pair, x, y, [])
            # proxy form: proxies made by their makeProxy (found by the loss through their name)
            model = fake_model(tf, d, n_classes)
            proxy_utils.makeProxy(model.arch, n_classes, per_class, name="class")
            proxy_variable(model).assign(proxies)
            proxy = loss_object(tf, framework, model, loss_name, params)
            assert proxy.use_proxy and proxy.proxy_per_class == per_class
            proxy_value, (proxy_gx, proxy_gp) = value_and_grads(tf, proxy, x, y, [proxy_variable(model)])
            # CCP: their CCPLoss with the pair loss `loss_name` (proxies created beforehand, no data set)
            model = fake_model(tf, d, n_classes)
            proxy_utils.makeProxy(model.arch, n_classes, per_class, name="ccp")
            proxy_variable(model).assign(proxies)
            cfg = config(framework)
            cfg.loss.ccp.function = loss_name
            # no data set to draw proxy candidates from (the proxies exist already), no projection callback
            cfg.loss.ccp.use_representative_proxy, cfg.loss.ccp.min_iterations = False, 0
            for k, v in params.items():
                cfg.loss[loss_name][k] = v
            ccp = framework.losses.ccp(model=model, cfg=cfg)
            ccp_value, (ccp_gx, ccp_gp) = value_and_grads(tf, ccp.loss_function, x, y, [proxy_variable(model)])
            assert abs(ccp_value - (0.1 * pair_value + 1.0 * proxy_value)) < 1e-5 * max(1.0, abs(ccp_value))
            np.testing.assert_allclose(ccp_gx, 0.1 * pair_gx + proxy_gx, rtol=1e-4, atol=1e-6)
            out.update({f"{key}_pair_value": pair_value, f"{key}_pair_grad_x": pair_gx,
                        f"{key}_proxy_value": proxy_value, f"{key}_proxy_grad_x": proxy_gx,
                        f"{key}_proxy_grad_p": proxy_gp,
                        f"{key}_ccp_value": ccp_value, f"{key}_ccp_grad_x": ccp_gx, f"{key}_ccp_grad_p": ccp_gp})
            if loss_name == "original_contrastive":
                golden_c1_eps(tf, framework, out, facts, key, x, y, proxies, params,
                              (pair_value, pair_gx), (proxy_value, proxy_gx, proxy_gp))
    facts["ccp_is_0.1_pair_plus_1.0_proxy"] = True


def golden_c1_eps(tf, framework, out, facts, key, x, y, proxies, params, pair, proxy):
    """Their C1 with its eps set to 0: the value rises by eps * #positives / #anchors, the gradients stay."""
    from framework.utilities import proxy_utils
    n_classes, d = 5, x.shape[1]
    pair0 = loss_object(tf, framework, fake_model(tf, d, n_classes), "original_contrastive", params, eps=0.0)
    pair0_value, (pair0_gx,) = value_and_grads(tf, pair0, x, y, [])
    model = fake_model(tf, d, n_classes)
    proxy_utils.makeProxy(model.arch, n_classes, len(proxies) // n_classes, name="class")
    proxy_variable(model).assign(proxies)
    proxy0 = loss_object(tf, framework, model, "original_contrastive", params, eps=0.0)
    proxy0_value, (proxy0_gx, proxy0_gp) = value_and_grads(tf, proxy0, x, y, [proxy_variable(model)])
    n_pos_pair = sum(int((y == c).sum() * ((y == c).sum() - 1)) for c in np.unique(y))
    n_pos_proxy = int(len(proxies) // n_classes * len(y))
    assert abs((pair0_value - pair[0]) - 1e-5 * n_pos_pair / len(y)) < 2e-6
    assert abs((proxy0_value - proxy[0]) - 1e-5 * n_pos_proxy / len(y)) < 2e-6
    np.testing.assert_array_equal(pair0_gx, pair[1])
    np.testing.assert_array_equal(proxy0_gx, proxy[1])
    np.testing.assert_array_equal(proxy0_gp, proxy[2])
    out.update({f"{key}_eps0_pair_value": pair0_value, f"{key}_eps0_proxy_value": proxy0_value})
    facts["c1_eps"] = {"eps": 1e-5, "gradients_identical": True,
                       "value_shift": "eps * #positive pairs / #anchors"}

# --------------------------------------------------------------------------- baselines (§4, §7)


def baseline_object(tf, framework, name, num_classes, d, head=None, **params):
    model = fake_model(tf, d, num_classes)
    cfg = config(framework, **(head or {}))
    for key, value in params.items():
        cfg.loss[name][key] = value
    return getattr(framework.losses, name)(model=model, cfg=cfg), model


def golden_baselines(tf, framework, rng, out, facts):
    d = 8
    # Proxy-Anchor and ProxyNCA++: 6 classes, one proxy each; a mixed batch and a one-class batch
    x = mixed_norm_rows(rng, 8, d)
    y = np.array([0, 0, 2, 2, 3, 1, 1, 5])
    x_one = mixed_norm_rows(rng, 3, d)
    y_one = np.array([2, 2, 2])
    p = mixed_norm_rows(rng, 6, d, low=(0.5, 0.95))
    out.update(pa_x=x, pa_y=y, pa_x_one=x_one, pa_y_one=y_one, pa_proxies=p)
    for name, key in (("proxy_anchor", "pa"), ("proxy_nca", "nca")):
        for suffix, (xb, yb) in {"": (x, y), "_one": (x_one, y_one)}.items():
            obj, model = baseline_object(tf, framework, name, 6, d)
            proxy_variable(model).assign(p)
            value, (gx, gp) = value_and_grads(tf, obj, xb, yb, [proxy_variable(model)])
            out.update({f"{key}{suffix}_value": value, f"{key}{suffix}_grad_x": gx, f"{key}{suffix}_grad_p": gp})
    cfg = config(framework)
    facts["proxy_anchor_shipped"] = dict(cfg.loss.proxy_anchor)
    facts["proxy_nca_shipped"] = dict(cfg.loss.proxy_nca)
    facts["computation_head_shipped"] = {k: v for k, v in cfg.loss.computation_head.items()}
    golden_soft_triple(tf, framework, rng, out, facts)


def golden_soft_triple(tf, framework, rng, out, facts):
    C, K, d = 4, 10, 8  # K = their shipped proxy_per_class
    # with their shipped head (samples as anchors, 'l2') the centres are split along the batch axis
    obj, _ = baseline_object(tf, framework, "soft_triple", C, d)
    try:
        labels, embeddings = (np.arange(32) % C).reshape(-1, 1).astype(np.int32), rng.normal(size=(32, d))
        obj.call(tf.constant(labels), tf.constant(embeddings.astype(np.float32)))
        facts["soft_triple_shipped_head_batch32"] = "ran"
    except Exception as error:  # tf.split of 32 rows into 10 parts
        facts["soft_triple_shipped_head_batch32"] = f"{type(error).__name__}: {str(error).splitlines()[0][:200]}"
    assert facts["soft_triple_shipped_head_batch32"] != "ran"
    head = {"proxy_anchor": True, "distance_function": "cos"}  # the orientation their formula is written for
    facts["soft_triple_golden_head"] = head
    x = mixed_norm_rows(rng, 8, d)
    y = np.array([0, 0, 1, 2, 2, 3, 3, 1])
    centres_in = mixed_norm_rows(rng, C * K, d, low=(0.3, 0.95), high=(0.3, 0.95))  # all inside the ball
    centres_out = mixed_norm_rows(rng, C * K, d, low=(1.1, 2.0), high=(1.1, 2.0))  # all outside
    out.update(st_x=x, st_y=y, st_centres_in=centres_in, st_centres_out=centres_out)  # K-major rows
    for name, (la, gamma, tau, delta) in SOFTTRIPLE_PARAMS.items():
        for taus, tau_value in (("", tau), ("_tau0", 0.0)):
            for where, centres in (("in", centres_in), ("out", centres_out)):
                obj, model = baseline_object(tf, framework, "soft_triple", C, d, head, proxy_per_class=K,
                                             lambda_softmax=la, gamma_entropy=gamma, tau_reg=tau_value,
                                             delta_margin=delta)
                proxy_variable(model).assign(centres)
                value, (gx, gp) = value_and_grads(tf, obj, x, y, [proxy_variable(model)])
                out.update({f"st_{name}{taus}_{where}_value": value, f"st_{name}{taus}_{where}_grad_x": gx,
                            f"st_{name}{taus}_{where}_grad_p": gp})
                if tau_value > 0:  # NaN exactly on the centres of a same-class pair with <c, c'> >= 1
                    nan_rows = np.flatnonzero(np.isnan(gp).any(axis=1))
                    assert np.array_equal(nan_rows, np.flatnonzero(in_a_bad_pair(centres, C, K)))
                    assert (len(nan_rows) > 0) == (where == "out") and np.isfinite(value) and np.isfinite(gx).all()
    facts["soft_triple_regularizer_nan"] = "gradient NaN on both centres of a same-class pair with <c, c'> >= 1"


def in_a_bad_pair(centres_k_major, C, K):
    """Rows (K-major) of centres that have a same-class partner with inner product >= 1."""
    c = centres_k_major.astype(np.float64).reshape(K, C, -1)
    gram = np.einsum("kcd,lcd->ckl", c, c)
    bad = (gram >= 1) & ~np.eye(K, dtype=bool)[None]
    return bad.any(axis=2).T.reshape(-1)

# --------------------------------------------------------------------------- Keras Adam (§7)


def golden_adam(tf, rng, out, facts):
    """The legacy OptimizerV2 Adam (what `tf.keras.optimizers.Adam` was when their code ran)."""
    shapes = {"vector": (4,), "matrix": (2, 3), "scalar": ()}
    steps = 10
    grads = {name: rng.normal(size=(steps, *shape)) for name, shape in shapes.items()}
    grads["vector"][:, 1] *= 1e-6  # gradients below 1e-5 ...
    grads["vector"][:, 2] = 3e-6 * np.sign(grads["vector"][:, 2])
    grads["vector"][4, :] = 0.0  # a step with zero gradient
    grads["matrix"][:, 0, :] *= 1e-7
    grads["scalar"][:] = 1e-6  # ... and a single scalar with g = 1e-6
    init = {name: rng.uniform(-1, 1, size=shape) for name, shape in shapes.items()}
    for dtype in (np.float32, np.float64):
        variables = {name: tf.Variable(init[name].astype(dtype)) for name in shapes}
        opt = tf.keras.optimizers.legacy.Adam(learning_rate=1e-3)  # beta (0.9, 0.999), epsilon 1e-7
        trajectory = {name: [v.numpy()] for name, v in variables.items()}
        for t in range(steps):
            opt.apply_gradients([(tf.constant(grads[name][t].astype(dtype)), variables[name]) for name in shapes])
            for name, v in variables.items():
                trajectory[name].append(v.numpy())
        suffix = "_f64" if dtype == np.float64 else ""
        if dtype == np.float64:  # lr and the betas live in float32 variables whatever the weights' dtype
            facts["keras_adam_float64_sees"] = {h: float(opt._get_hyper(h, tf.float64).numpy())
                                                for h in ("learning_rate", "beta_1", "beta_2")}
            assert facts["keras_adam_float64_sees"]["beta_2"] == float(np.float32(0.999))
        for name in shapes:
            out[f"adam_{name}_grads{suffix}"] = grads[name].astype(dtype)
            out[f"adam_{name}_trajectory{suffix}"] = np.stack(trajectory[name])
    out["adam_hyper"] = np.array([1e-3, 0.9, 0.999, 1e-7])

# --------------------------------------------------------------------------- greedy k-center (§5)


def golden_kcenter(tf, framework, rng, out):
    from framework.utilities import proxy_utils
    C, b, d, K = 3, 9, 4, 4

    def picks(points, init):
        # their function returns the chosen points (K-major rows); map them back to pool indices
        chosen = proxy_utils.greedyKCenter(tf.constant(points), tf.constant(init), K).numpy().reshape(K, C, d)
        return np.array([[int(np.flatnonzero((points[c] == chosen[k, c]).all(axis=1))[0]) for k in range(K)]
                         for c in range(C)])

    def robust(points, init, chosen):
        # no near-tie: small perturbations of the pool give the same choices under their own function
        for s in range(3):
            noisy = points * (1 + 1e-4 * np.random.default_rng(s).normal(size=points.shape)).astype(np.float32)
            if not np.array_equal(picks(noisy, init), chosen):
                return False
        return True

    while True:
        pool = (rng.normal(size=(C, b, d)) * rng.uniform(0.5, 2.0, size=(C, b, 1))).astype(np.float32)
        inits = {"zero": np.zeros((C, K, d), np.float32),  # their first selection: P* still all zeros
                 "given": rng.normal(size=(C, 2, d)).astype(np.float32)}
        chosen = {name: picks(pool, init) for name, init in inits.items()}
        if all(robust(pool, inits[name], chosen[name]) for name in inits):
            break
    out.update(kcenter_pool=pool, kcenter_initial=inits["given"], kcenter_zero_picks=chosen["zero"],
               kcenter_given_picks=chosen["given"])

# --------------------------------------------------------------------------- retrieval metrics (§6)


def no_near_ties(queries, gallery, self_retrieval: bool, gap: float = 1e-3) -> bool:
    dist = np.sqrt(((queries[:, None].astype(np.float64) - gallery[None]) ** 2).sum(-1))
    if self_retrieval:
        np.fill_diagonal(dist, np.inf)
    ordered = np.sort(dist, axis=1)
    ordered = ordered[:, :-1] if self_retrieval else ordered
    return bool(np.all(np.diff(ordered, axis=1) > gap))


def golden_metrics(tf, framework, rng, out):
    from framework.metrics.metric_functions import atKMetrics
    ks = np.array([1, 2, 4, 8], np.int32)
    # self-retrieval: 30 points, class sizes 2..6 and one singleton (a query without any match)
    y = np.repeat(np.arange(8), [2, 3, 4, 5, 6, 4, 5, 1])
    while True:
        x = (rng.normal(size=(len(y), 4)) + 0.8 * rng.normal(size=(8, 4))[y]).astype(np.float32)
        if no_near_ties(x, x, True):
            break
    m = atKMetrics(tf.constant(x), tf.constant(y[:, None].astype(np.int32)), tf.constant(ks)).numpy()
    out.update(metrics_self_x=x, metrics_self_y=y, metrics_self_values=m, metrics_ks=ks)
    # query / gallery: their ref_embeddings are the queries; query class 6 has no gallery item
    qy, gy = np.repeat(np.arange(7), 2), np.repeat(np.arange(6), [3, 4, 2, 5, 3, 3])
    while True:
        centres = rng.normal(size=(7, 4))
        q = (rng.normal(size=(len(qy), 4)) + centres[qy]).astype(np.float32)
        g = (rng.normal(size=(len(gy), 4)) + centres[gy]).astype(np.float32)
        if no_near_ties(q, g, False):
            break
    m = atKMetrics(tf.constant(g), tf.constant(gy[:, None].astype(np.int32)), tf.constant(ks),
                   ref_embeddings=tf.constant(q), ref_labels=tf.constant(qy[:, None].astype(np.int32)),
                   has_self_match=False).numpy()
    out.update(metrics_q=q, metrics_qy=qy, metrics_g=g, metrics_gy=gy, metrics_qg_values=m)

# --------------------------------------------------------------------------- the 512-D ensemble (§7)


def golden_ensemble(tf, framework, rng, out):
    """Their evaluateModel builds it inline: each model's n(f), tf.concat, then n again (their layer)."""
    n_layer = framework.layers.L2Normalization
    # 4 parts x 6 rows x 3-D: row 0 short in every part (the concatenation stays inside the ball
    # too), row 1 long in every part, the other rows mixed; no norm within 0.1 of 1
    norms = rng.choice([0.1, 0.3, 0.6, 1.3, 2.0, 3.0], size=(4, 6))
    norms[:, 0], norms[:, 1] = [0.1, 0.2, 0.3, 0.4], [1.3, 2.0, 3.0, 1.5]
    directions = rng.normal(size=(4, 6, 3))
    parts = (directions / np.linalg.norm(directions, axis=2, keepdims=True) * norms[:, :, None]).astype(np.float32)
    normalized = [n_layer()(tf.constant(p)) for p in parts]
    joined = n_layer()(tf.concat(normalized, axis=-1)).numpy()
    assert np.linalg.norm(joined[0]) < 0.9 and abs(np.linalg.norm(joined[1]) - 1) < 1e-6
    out.update(ensemble_parts=parts, ensemble_value=joined)

# --------------------------------------------------------------------------- cross-batch memory (§7)


def golden_xbm(tf, framework, rng, out, facts):
    """Their XBMLoss over 6 batches: a memory of 2 batches of 3 classes x 2 that fills from batch 1."""
    d, P, m, L, start = 6, 3, 2, 2, 1
    for loss_name, params, key in (("original_contrastive", {"margin": 0.5}, "c1"),
                                   ("contrastive", DATASET_PARAMS["sop"]["contrastive"], "c2")):
        model = fake_model(tf, d, 5)
        cfg = config(framework)
        cfg.training.classes_per_batch, cfg.training.sample_per_class = P, m
        cfg.model.embedding_head.embedding_size = d
        cfg.loss.xbm.function, cfg.loss.xbm.batches_in_mem, cfg.loss.xbm.start_at = loss_name, L, start
        for k, v in params.items():
            cfg.loss[loss_name][k] = v
        obj = framework.losses.xbm(model=model, cfg=cfg)
        if loss_name == "original_contrastive":
            obj.loss_fn.eps = 0.0  # their C1's constant shift (golden_c1_eps), which the memory's positives would scale
        values, grads, xs, ys, ready = [], [], [], [], []
        for _ in range(6):
            y = np.repeat(rng.choice(5, P, replace=False), m)
            x = mixed_norm_rows(rng, P * m, d)
            value, (gx,) = value_and_grads(tf, obj, x, y, [])
            values.append(value), grads.append(gx), xs.append(x), ys.append(y)
            ready.append(bool(obj.loss_fn.ready.numpy()))
        out.update({f"xbm_{key}_x": np.stack(xs), f"xbm_{key}_y": np.stack(ys), f"xbm_{key}_value": np.array(values),
                    f"xbm_{key}_grad_x": np.stack(grads)})
        # the memory's term is on from batch start + L - 1: the memory is full with this batch stored
        assert ready == [b >= start + L - 1 for b in range(6)], ready
    out["xbm_setup"] = np.array([L, start])
    facts["xbm"] = {"order": "the batch is stored before the loss: the memory a batch meets holds its own copy",
                    "term_on_from_batch": "start_at + batches_in_mem - 1 (0-based)", "c1_eps_set_to": 0.0}

# --------------------------------------------------------------------------- the m-per-class sampler (§7)


def sampler_rounds(labels, batches, classes_per_batch, m):
    """Their batch lists items as s_i1, s_j1, ..., s_i2, s_j2, ...: undo it into class visits."""
    return [[batch[j + t * classes_per_batch] for t in range(m)]
            for batch in batches for j in range(classes_per_batch)]


def check_sampler_property(labels, visits, m, num_classes, cycle_rounds):
    """Rounds: visits r*C..(r+1)*C-1 are every class once. Images: within each class's picks of one
    cycle (cycle_rounds * m picks), consecutive blocks of the class's size are all distinct."""
    labels = np.asarray(labels)
    classes = [int(labels[v[0]]) for v in visits]
    assert all(len({int(labels[i]) for i in v}) == 1 for v in visits)
    for r in range(len(classes) // num_classes):
        assert sorted(classes[r * num_classes:(r + 1) * num_classes]) == list(range(num_classes)), r
    picks = collections.defaultdict(list)
    for v in visits:
        picks[int(labels[v[0]])] += v
    across_cycles = 0
    for c, seq in picks.items():
        size = int((labels == c).sum())
        for start in range(0, len(seq), cycle_rounds * m):
            cycle = seq[start:start + cycle_rounds * m]
            for p in range(0, len(cycle), size):
                assert len(set(cycle[p:p + size])) == len(cycle[p:p + size]), (c, start, p)
        across_cycles += sum(len(set(seq[p:p + size])) != len(seq[p:p + size]) for p in range(0, len(seq), size))
    return across_cycles


def golden_sampler(tf, framework, facts):
    from framework.datasets import samplers
    sizes = [3, 4, 5, 6, 7, 8, 9, 3, 5, 9]  # 10 classes with 3..9 images
    labels = [c for c, n in enumerate(sizes) for _ in range(n)]
    lines = [f"{c} img_{i}" for i, c in enumerate(labels)]  # their "<label> <path> ..." rows
    runs = []
    for m, classes_per_batch, seed in ((4, 4, 1), (2, 4, 2), (2, 3, 3)):
        tf.random.set_seed(seed)
        dataset = samplers.MPerClass(classes_per_batch=classes_per_batch, sample_per_class=m)(lines)
        n_batches = 60
        batches = [[int(item.decode().split()[1][4:]) for item in b.numpy()] for b in dataset.take(n_batches)]
        visits = sampler_rounds(labels, batches, classes_per_batch, m)
        avg = len(labels) / len(sizes)
        cycle_rounds = math.ceil(avg / m)  # their pick_repeats
        across = check_sampler_property(labels, visits, m, len(sizes), cycle_rounds)
        twice = sum(len({labels[i] for i in b}) < classes_per_batch for b in batches)
        runs.append({"m": m, "classes_per_batch": classes_per_batch, "tf_seed": seed, "batches": batches,
                     "cycle_rounds": cycle_rounds, "blocks_repeating_across_cycles": int(across),
                     "batches_with_a_class_twice": int(twice)})
    facts["sampler"] = {"rounds": "every class once per round", "images": "no repeat before exhaustion "
                        "within a cycle of ceil(mean images per class / m) rounds; queues restart each cycle",
                        "runs": [{k: v for k, v in r.items() if k != "batches"} for r in runs]}
    # k-center's candidates: their OnePerClass stream, one image of every class (in class order) per
    # round, cut into batches of proxy_sampling_batch_size; a pool of b takes b rounds (ccp/loss.py)
    tf.random.set_seed(4)
    batch_size = 4
    stream = iter(samplers.OnePerClass(batch_size=batch_size)(lines))
    rounds = []
    for _ in range(30):
        items = [int(item.decode().split()[1][4:]) for _ in range(math.ceil(len(sizes) / batch_size))
                 for item in next(stream).numpy()]
        assert [labels[i] for i in items] == list(range(len(sizes)))
        rounds.append(items)
    cycle = math.ceil(len(labels) / len(sizes))  # their pick_repeats with one image per class
    across = check_sampler_property(labels, [[i] for r in rounds for i in r], 1, len(sizes), cycle)
    one_per_class = {"batch_size": batch_size, "tf_seed": 4, "rounds": rounds, "cycle_rounds": cycle,
                     "blocks_repeating_across_cycles": int(across)}
    facts["one_per_class"] = {k: v for k, v in one_per_class.items() if k != "rounds"}
    return {"labels": labels, "item_order": "their batch lists s_i1, s_j1, ..., s_i2, ...: "
            "item t*classes_per_batch + j is image t of the batch's j-th class visit", "runs": runs,
            "one_per_class": one_per_class}

# --------------------------------------------------------------------------- main


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--authors", type=Path, required=True, help="checkout of github.com/yetigurbuz/ccp-dml")
    parser.add_argument("--out", type=Path, default=HERE)
    args = parser.parse_args()
    tf, framework = import_authors(args.authors.resolve())
    rng = np.random.default_rng(20240110)
    out, facts = {}, {}
    golden_normalize(tf, framework, rng, out)
    golden_losses(tf, framework, rng, out, facts)
    golden_baselines(tf, framework, rng, out, facts)
    golden_adam(tf, rng, out, facts)
    golden_kcenter(tf, framework, rng, out)
    golden_metrics(tf, framework, rng, out)
    golden_ensemble(tf, framework, rng, out)
    golden_xbm(tf, framework, rng, out, facts)
    sampler = golden_sampler(tf, framework, facts)
    args.out.mkdir(parents=True, exist_ok=True)
    np.savez_compressed(args.out / "authors.npz", **{k: np.asarray(v) for k, v in out.items()})
    (args.out / "authors_sampler.json").write_text(json.dumps(sampler, separators=(",", ":")) + "\n")
    import keras
    meta = {"commit": AUTHORS_COMMIT, "tensorflow": tf.__version__, "keras": keras.__version__,
            "numpy": np.__version__, "python": sys.version.split()[0], "facts": facts}
    (args.out / "authors_meta.json").write_text(json.dumps(meta, indent=1, default=str) + "\n")
    total = sum((args.out / f).stat().st_size for f in ("authors.npz", "authors_sampler.json", "authors_meta.json"))
    print(f"wrote {len(out)} arrays, {total / 1024:.0f} KiB in all, to {args.out}")


if __name__ == "__main__":
    main()
