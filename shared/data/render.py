"""Procedural camera frames: sprites, scenes, camera looks and one rendered frame with its labels."""

from __future__ import annotations

import zlib

import cv2
import numpy as np

LOOKS = {  # gain, haze, sensor noise (of 255), blur sigma, gamma, BGR colour cast
    "day": (1.0, 0.0, 1.5, 1.5, 1.0, (1, 1, 1)), "dusk": (0.7, 0.05, 4, 1.0, 1.15, (0.7, 0.85, 1.15)),
    "night": (0.45, 0.0, 7, 1.5, 1.25, (1.2, 0.95, 0.8)), "indoor": (0.9, 0.0, 3, 1.0, 1.0, (0.95, 1.12, 0.9)),
    "overcast": (0.85, 0.2, 3, 1.0, 1.0, (1.08, 1.0, 0.95)), "ir": (0.95, 0.05, 6, 1.2, 0.85, (1, 1, 1))}
# Mounting: person height as a fraction of imgsz, and objects per frame (a far view sees more, smaller things).
VIEWS = {"far": ((0.07, 0.22), (3, 8)), "mid": ((0.14, 0.42), (2, 5)), "near": ((0.32, 0.85), (1, 3))}
SCENES = {"person": ("doorway", "plaza"), "car": ("parking", "street"), "bicycle": ("park", "street")}
GROUND = {"street": (95, 95, 100), "parking": (80, 82, 85), "park": (50, 140, 80), "plaza": (160, 170, 180)}
HEIGHT = {"person": 1.0, "car": 0.8, "bicycle": 0.6}  # object height relative to a person at the same distance
PROPS = {"pole": (2.2, 0.3), "bush": (0.5, 1.6), "box": (0.45, 1.2), "sign": (1.3, 0.5), "tree": (2.6, 0.8)}  # h, w/h
SKIN = np.array([(60, 90, 140), (80, 120, 170), (110, 160, 210), (140, 190, 230), (45, 65, 100)], float)
PAINT = np.array([(240, 240, 240), (30, 30, 30), (150, 150, 150), (40, 40, 180), (150, 80, 30), (50, 110, 60),
                  (60, 170, 220), (200, 200, 190)], float)  # colours are float64: cv2 rejects float32 scalars
_poly = lambda im, pts, **kw: cv2.drawContours(im, [np.asarray(pts, np.int32)], -1, **kw)  # noqa: E731


class _Sprite:
    """Colour patch plus coverage mask painted together, so the mask is exactly the pixels the object owns."""

    def __init__(self, h: int, w: int):
        self.h, self.w, self.img, self.mask = h, w, np.zeros((h, w, 3), np.uint8), np.zeros((h, w), np.uint8)

    def __call__(self, op, *args, c, t=-1):
        op(self.img, *args, color=c, thickness=t)  # cv2 saturates colours to 0..255 itself
        op(self.mask, *args, color=255, thickness=t)

    def finish(self, rng, amp=0.12, shade=(1.1, 0.85)) -> _Sprite:
        # Low-frequency texture and top-to-bottom shading keep objects from being flat colour blobs.
        n = cv2.resize(rng.standard_normal((self.h // 4 + 2, self.w // 4 + 2), dtype=np.float32), (self.w, self.h))
        f = (1 + amp * n) * np.linspace(*shade, self.h, dtype=np.float32)[:, None]
        self.img = np.clip(self.img * f[..., None], 0, 255).astype(np.uint8)
        if rng.random() < 0.5:  # facing left or right
            self.img, self.mask = self.img[:, ::-1].copy(), self.mask[:, ::-1].copy()
        return self

    def paste(self, img, owner, x0, y0, oid):  # clipped at the borders; `owner` records who is visible where
        s = img.shape[0]
        ax0, ay0, ax1, ay1 = max(x0, 0), max(y0, 0), min(x0 + self.w, s), min(y0 + self.h, s)
        if ax0 < ax1 and ay0 < ay1:
            m = self.mask[ay0 - y0:ay1 - y0, ax0 - x0:ax1 - x0] > 0
            img[ay0:ay1, ax0:ax1][m] = self.img[ay0 - y0:ay1 - y0, ax0 - x0:ax1 - x0][m]
            owner[ay0:ay1, ax0:ax1][m] = oid


def _person(rng, h):
    sp, th = _Sprite(h, max(4, int(h * 0.62))), lambda f: max(1, int(f * h))
    q = lambda x, y: (int(sp.w / 2 + x * h), int(y * h))  # noqa: E731 - body coordinates in units of height
    skin, shirt = SKIN[rng.integers(len(SKIN))] * rng.uniform(0.85, 1.1), rng.uniform(20, 240, 3)
    pants = [(130, 80, 40), (35, 35, 35), (110, 160, 180), (100, 100, 100), rng.uniform(20, 200, 3)][rng.integers(5)]
    a, b, raised = rng.uniform(-0.4, 0.4), rng.uniform(0.8, 1.2), rng.random() < 0.15  # stride, build, waving
    for s, k in ((-1, 0.75), (1, 1.0)):  # far-side limbs first and darker, so they read as behind the torso
        hx, ang = s * 0.05 * b, s * a
        knee = (hx + 0.24 * np.sin(ang), 0.5 + 0.24 * np.cos(ang))
        foot = (knee[0] + 0.23 * np.sin(ang / 2), knee[1] + 0.23 * np.cos(ang / 2))
        sp(cv2.line, q(hx, 0.5), q(*knee), c=np.multiply(pants, k), t=th(0.075))
        sp(cv2.line, q(*knee), q(*foot), c=np.multiply(pants, k), t=th(0.065))
        sp(cv2.ellipse, q(foot[0] + 0.02, foot[1]), (th(0.04), th(0.018)), 0, 0, 360, c=(25, 25, 30))
        sx, ang = s * 0.115 * b, 2.6 if raised and s > 0 else -s * a * 0.8 + s * 0.15
        elbow = (sx + 0.16 * np.sin(ang), 0.21 + 0.16 * np.cos(ang))
        hand = (elbow[0] + 0.15 * np.sin(ang + 0.3), elbow[1] + 0.15 * np.cos(ang + 0.3))
        sp(cv2.line, q(sx, 0.21), q(*elbow), c=shirt * k, t=th(0.055))
        sp(cv2.line, q(*elbow), q(*hand), c=(shirt if rng.random() < 0.6 else skin) * k, t=th(0.045))
        sp(cv2.circle, q(*hand), th(0.025), c=skin * k)
        if s < 0:
            sp(_poly, [q(-0.12 * b, 0.19), q(0.12 * b, 0.19), q(0.1 * b, 0.53), q(-0.1 * b, 0.53)], c=shirt)
    sp(cv2.line, q(0, 0.14), q(0, 0.19), c=skin, t=th(0.05))
    sp(cv2.circle, q(0, 0.085), th(0.065), c=skin)
    sp(cv2.ellipse, q(0, 0.075), (th(0.068), th(0.05)), 0, 180, 360, c=rng.uniform(10, 90, 3) * (1, 1, 1.3))
    return sp.finish(rng, shade=(1.05, 0.9))


def _car(rng, h):
    paint, rear = PAINT[rng.integers(len(PAINT))] * rng.uniform(0.8, 1.1), rng.random() < 0.3
    glass, dark, tyre, red = (70, 55, 45), paint * 0.45, (20, 20, 22), (30, 30, 200)
    sp = _Sprite(h, max(4, int(h * (rng.uniform(1.1, 1.3) if rear else rng.uniform(2.2, 2.7)))))
    q = lambda x, y: (int(x * sp.w), int(y * h))  # noqa: E731
    if rear:  # cabin and rear window, then tyres, body, tail lights, plate, bumper
        for d, u, v, col in ((0, 0.4, 0.04, paint), (0.05, 0.37, 0.09, glass)):
            sp(_poly, [q(0.12 + d, u), q(0.2 + d, v), q(0.8 - d, v), q(0.88 - d, u)], c=col)
        rects = [(0.06, 0.8, 0.22, 0.99, tyre), (0.78, 0.8, 0.94, 0.99, tyre), (0.02, 0.38, 0.98, 0.86, paint),
                 (0.04, 0.45, 0.22, 0.55, red), (0.78, 0.45, 0.96, 0.55, red), (0.37, 0.58, 0.63, 0.69, (225,) * 3)]
    else:  # side view: body, cabin (sedan to van), windows; pillar, crease, sill, head and tail lights; wheels
        a, b, c, d = rng.uniform(0.1, 0.2), rng.uniform(0.22, 0.35), rng.uniform(0.55, 0.66), rng.uniform(0.72, 0.8)
        p = (b + c) / 2  # door pillar
        sp(_poly, [q(0.01, 0.45), q(0.05, 0.37), q(0.96, 0.39), q(1.0, 0.5), q(1.0, 0.76), q(0.0, 0.76)], c=paint)
        sp(_poly, [q(a, 0.4), q(b, 0.03), q(c, 0.03), q(d, 0.4)], c=paint)
        sp(_poly, [q(a + 0.04, 0.38), q(b + 0.02, 0.09), q(c - 0.01, 0.09), q(d - 0.05, 0.38)], c=glass)
        rects = [(p - 0.01, 0.05, p + 0.01, 0.72, paint * 0.7), (0.02, 0.46, 0.98, 0.48, paint * 1.25),
                 (0.0, 0.64, 1.0, 0.74, dark), (0.95, 0.43, 1.0, 0.52, (170, 235, 250)), (0.0, 0.42, 0.03, 0.52, red)]
    for x0, y0, x1, y1, col in rects:
        sp(cv2.rectangle, q(x0, y0), q(x1, y1), c=col)
    for x in () if rear else (0.2, 0.8):  # wheel arch, tyre, rim, hub
        for y, r, col in ((0.76, 0.24, (35,) * 3), (0.78, 0.21, tyre), (0.78, 0.11, (160,) * 3), (0.78, 0.03, dark)):
            sp(cv2.circle, q(x, y), max(1, int(r * h)), c=col)
    return sp.finish(rng, amp=0.06, shade=(1.15, 0.8))


def _bicycle(rng, h):
    sp, r, t = _Sprite(h, max(4, int(h * 1.75))), 0.37 * rng.uniform(0.9, 1.0), max(1, int(0.04 * h))
    q = lambda x, y: (int(x * h), int(y * h))  # noqa: E731
    R, F, B, S, Hb = (0.37, 1 - r), (1.38, 1 - r), (0.78, 0.68), (0.64, 0.2), (1.24, 0.33)  # hubs, crank, seat, head
    Ht, spin, frame = (1.2, 0.2) if rng.random() < 0.7 else (0.95, 0.45), rng.uniform(0, np.pi), rng.uniform(20, 240, 3)
    for cx, cy in (R, F):
        for ang in spin + np.arange(n := int(rng.integers(6, 13))) * 2 * np.pi / n:
            sp(cv2.line, q(cx, cy), q(cx + r * 0.9 * np.cos(ang), cy + r * 0.9 * np.sin(ang)), c=(175,) * 3, t=1)
        sp(cv2.circle, q(cx, cy), int(r * h), c=(25, 25, 25), t=max(1, int(0.05 * h)))
        sp(cv2.circle, q(cx, cy), max(1, int(0.03 * h)), c=(150, 150, 150))
    for p0, p1 in ((R, B), (R, S), (B, S), (S, Ht), (B, Hb), (Hb, F), (Hb, (1.2, 0.08))):  # low Ht: step-through
        sp(cv2.line, q(*p0), q(*p1), c=frame, t=t)
    sp(cv2.line, q(1.2, 0.08), q(1.06, 0.05), c=(30, 30, 30), t=t)  # handlebar
    sp(cv2.ellipse, q(0.62, 0.16), (max(1, int(0.09 * h)), max(1, int(0.03 * h))), 0, 0, 360, c=(30, 30, 30))
    return sp.finish(rng, amp=0.05, shade=(1.0, 1.0))


def _generic(rng, h, name):
    # Star polygon and hue from a stable hash of the name (not the salted hash()), so any class is drawable.
    hsh = zlib.crc32(name.encode())
    k, n = np.arange(2 * (3 + hsh % 6)), 3 + hsh % 6  # 3..8 points, star-shaped or convex
    rad, angs = 0.48 - (hsh >> 3) % 3 * 0.2 * (k % 2), rng.uniform(-0.2, 0.2) + np.pi * k / n
    sp = _Sprite(h, max(4, int(h * (0.7 + (hsh >> 11) % 7 * 0.1))))
    col = np.clip(np.array([(hsh >> 8) % 256, (hsh >> 16) % 256, hsh >> 24]) + rng.normal(0, 20, 3), 20, 235)
    sp(_poly, np.stack([(0.5 + rad * np.sin(angs)) * sp.w, (0.5 - rad * np.cos(angs)) * h], 1), c=col)
    return sp.finish(rng, amp=0.3)


def _prop(rng, kind, h):
    """Clutter that is never labelled: poles, signs, trees, bushes, boxes."""
    sp = _Sprite(h, max(3, int(h * PROPS[kind][1] * rng.uniform(0.75, 1.3))))
    q, green = (lambda x, y: (int(x * sp.w), int(y * h))), rng.uniform((20, 80, 20), (60, 150, 70))
    if kind in ("pole", "sign", "tree"):  # post or trunk
        sp(cv2.rectangle, q(0.45, 0.45 if kind == "tree" else 0.1), q(0.55, 1), c=(rng.uniform(50, 110),) * 3)
    if kind == "pole":  # street lamp: a bright arm on the post
        sp(cv2.line, q(0.5, 0.1), q(0.95, 0.05), c=(210, 230, 240), t=max(1, h // 50))
    elif kind == "sign":  # white plate or triangle with a coloured disc
        plate = [q(0, 0), q(1, 0), q(1, 0.4), q(0, 0.4)] if rng.random() < 0.6 else [q(0.5, 0), q(1, 0.4), q(0, 0.4)]
        sp(_poly, plate, c=(235, 235, 235))
        sp(cv2.circle, q(0.5, 0.22), int(0.3 * sp.w), c=[(40, 40, 200), (160, 80, 20), (30, 200, 230)][rng.integers(3)])
    elif kind == "box":  # cardboard or grey crate with tape
        col = rng.uniform(0.8, 1.1) * np.array([(60, 110, 150), (120, 120, 120)][rng.integers(2)])
        for x0, y0, x1, y1, c in ((0, 0.3, 1, 1, col), (0.46, 0.3, 0.54, 1, col * 0.6), (0, 0.62, 1, 0.67, col * 0.6)):
            sp(cv2.rectangle, q(x0, y0), q(x1, y1), c=c)
    else:  # bush, or the tree's canopy: a clump of leafy circles
        for cy in rng.uniform(*((0.55, 0.8) if kind == "bush" else (0.15, 0.45)), 9):
            rad = int(rng.uniform(0.18, 0.3) * min(sp.w, h))
            sp(cv2.circle, q(rng.uniform(0.25, 0.75), cy), rad, c=green * rng.uniform(0.7, 1.2))
    return sp.finish(rng, amp=0.2)


def scene(rng, size, domain):
    """Background (uint8), horizon row fraction, props standing in front of objects, and the light map."""
    kind, (y, x) = domain["scene"], np.mgrid[0:size, 0:size].astype(np.float32) / size
    horizon = {"doorway": rng.uniform(0.5, 0.62), "abstract": 0.0}.get(kind, rng.uniform(0.25, 0.5))
    top = rng.uniform(120, 230, 3) if kind == "doorway" else rng.uniform(150, 250, 3) * (1.0, 0.85, 0.7)  # wall or sky
    ground = np.array(GROUND.get(kind, rng.uniform(40, 220, 3)), float)
    img = np.where(y[..., None] < horizon, top * (0.8 + 0.3 * y[..., None] / max(horizon, 1e-3)),
                   ground * rng.uniform(0.8, 1.2))
    horizon_px, vx, img = int(horizon * size), int(rng.uniform(0.3, 0.7) * size), np.ascontiguousarray(img, np.float32)
    skyline = kind in ("street", "plaza", "park")
    for x0 in range(-int(rng.integers(0, size // 6)), size, max(2, size // 8)) if skyline else ():
        col = rng.uniform(60, 200, 3) if kind != "park" else (40, 90, 40)  # skyline (or treeline) on the horizon
        cv2.rectangle(img, (x0, int(horizon_px * rng.uniform(0.2, 0.8))), (x0 + size // 8, horizon_px), col, -1)
    if kind in ("street", "parking", "doorway", "plaza"):  # lane, bay or tile lines converging on the horizon
        col = (225, 225, 225) if kind != "doorway" else ground * 0.6
        for xb in np.linspace(-size, 2 * size, 7 if kind == "street" else 13):
            cv2.line(img, (int(xb), size), (int(vx + (xb - vx) * 0.15), horizon_px), col, max(1, size // 120))
        for t in np.linspace(0.05, 1, 6 if kind != "street" else 0) ** 2:
            row = int(horizon_px + t * (size - horizon_px))
            cv2.line(img, (0, row), (size, row), col, max(1, size // 160))
    if kind == "doorway":
        door = rng.uniform(20, 110, 3)
        cv2.rectangle(img, (vx - size // 10, int(horizon_px * 0.15)), (vx + size // 10, horizon_px), door, -1)
    cells = int(rng.integers(3, 9))  # fractal value noise, upsampled from coarse grids: vectorised, cheap at any size
    grids = [rng.standard_normal((cells * 2**o,) * 2, dtype=np.float32) * 0.5**o for o in range(3)]
    tex = sum(cv2.resize(g, (size, size), interpolation=cv2.INTER_CUBIC) for g in grids)
    tex *= 0.16 if kind == "park" else 0.08
    img = np.clip(img * (1 + tex)[..., None], 0, 255).astype(np.uint8)
    props, fg, owner, n = [], [], np.zeros((size, size), np.int16), domain["props"]
    for kind_p, foot in zip(rng.choice(list(PROPS), n), rng.uniform(max(horizon, 0.2), 1.05, n)):
        sp = _prop(rng, str(kind_p), max(6, int(size * PROPS[kind_p][0] * 0.4 * (foot - horizon * 0.8))))
        props.append((foot, sp, int(rng.uniform(-0.1, 0.9) * size), int(foot * size) - sp.h))
    for foot, sp, x0, y0 in sorted(props, key=lambda p: p[0]):  # the nearest props will occlude objects too
        fg.append((sp, x0, y0)) if foot > 0.93 else sp.paste(img, owner, x0, y0, 0)
    lmap = (1 - domain["vignette"] * np.hypot(x - 0.5, y - 0.5) ** 2)[..., None]
    lmap = lmap * domain["gain"] * np.float32(domain["cast"])
    for cx, cy, rad in zip(*rng.uniform((0.1, 0.1, 0.15), (0.9, 0.6, 0.35), (domain["lamps"], 3)).T):  # warm lamp pools
        lmap += np.exp(-((x - cx) ** 2 + (y - cy) ** 2) / rad**2)[..., None] * np.float32((0.45, 0.7, 0.9))
    return img, horizon, fg, lmap


def camera_domain(seed, index, names):
    rng, shared = np.random.default_rng([seed, 2, index]), np.random.default_rng([seed, 3])  # RNG: world.py
    perm, off = shared.permutation(len(names)), shared.integers(0, 30, 2)  # first nc cameras favour distinct classes
    dominant = names[int(perm[index % len(names)])]
    light, view = list(LOOKS)[(index + off[0]) % 6], list(VIEWS)[(index + off[1]) % 3]
    mix = rng.dirichlet(np.ones(len(names))) * 0.35 + 0.65 * (np.arange(len(names)) == names.index(dominant))
    gain, haze, noise, blur, gamma, cast = LOOKS[light]
    rounded = lambda v: round(float(v), 4)  # noqa: E731 - stored rounded and used rounded, so world.json is exact
    place = str(rng.choice(SCENES.get(dominant, ("street", "plaza", "park", "parking"))))
    return {"name": f"cam{index:02d}", "scene": place, "light": light, "view": view, "dominant": dominant,
            "mix": [rounded(p) for p in mix], "haze": haze, "gamma": gamma,
            "gain": rounded(gain * rng.uniform(0.9, 1.1)), "cast": [rounded(c * rng.uniform(0.97, 1.03)) for c in cast],
            "noise": rounded(noise * rng.uniform(0.8, 1.3)), "blur": rounded(blur * rng.uniform(0.3, 1.0)),
            "scale": list(VIEWS[view][0]), "objects": list(VIEWS[view][1]), "props": int(rng.integers(3, 8)),
            "lamps": int(rng.integers(1, 4)) if light == "night" else 0, "vignette": rounded(rng.uniform(0.2, 0.9))}


def frame(rng, size, names, domain, backdrop):
    """One image and its label text; `domain` None means the base domain, where everything is drawn afresh per image."""
    if domain is None:  # base: a fresh daylight scene, balanced classes, and a random scale range per image
        lo = np.exp(rng.uniform(np.log(0.08), np.log(0.4)))
        domain = {"scene": str(rng.choice(["street", "parking", "park", "plaza", "doorway", "abstract"])), "props": 4,
               "gain": rng.uniform(0.85, 1.15), "cast": rng.uniform(0.96, 1.04, 3), "lamps": 0, "vignette": 0.0,
               "gamma": 1.0, "haze": 0.0, "blur": rng.uniform(0, 0.8), "noise": rng.uniform(0.5, 3), "objects": (1, 6),
               "mix": [1] * len(names), "scale": (lo, min(0.8, lo * rng.uniform(1.5, 3)))}
        backdrop = scene(rng, size, domain)
    (_, horizon, fg, lmap), img, objs, owner = backdrop, backdrop[0].copy(), [], np.zeros((size, size), np.int16)
    for _ in range(int(rng.integers(domain["objects"][0], domain["objects"][1] + 1))):
        cls, t = int(rng.choice(len(names), p=np.array(domain["mix"]) / sum(domain["mix"]))), rng.uniform(0, 1)
        # Perspective: objects standing lower in the frame are nearer, so bigger, within the mounting'size range.
        foot, ph = horizon + (1.08 - horizon) * t, domain["scale"][0] + (domain["scale"][1] - domain["scale"][0]) * t
        h = max(6, int(ph * size * HEIGHT.get(names[cls], 0.7) * rng.uniform(0.9, 1.1)))
        draw = {"person": _person, "car": _car, "bicycle": _bicycle}.get(names[cls])
        sp = draw(rng, h) if draw else _generic(rng, h, names[cls])
        objs.append((foot, cls, sp, int(rng.uniform() * (size - 0.7 * sp.w) - 0.15 * sp.w), int(foot * size) - sp.h))
    objs.sort(key=lambda o: o[0])  # painter'size order: nearer (lower) objects occlude farther ones
    for oid, (sp, x0, y0) in enumerate([o[2:] for o in objs] + fg, start=1):
        sp.paste(img, owner, x0, y0, oid if oid <= len(objs) else 0)
    visible, lines = np.bincount(owner.ravel(), minlength=len(objs) + 1), []
    for oid, (_, cls, sp, _, _) in enumerate(objs, start=1):
        if visible[oid] < 0.3 * np.count_nonzero(sp.mask):
            continue  # more than ~70% occluded or outside the frame: unlabelled, as an annotator would skip it
        x, y, w, h = cv2.boundingRect((owner == oid).astype(np.uint8))  # visible extent, COCO-style
        if w >= 2 and h >= 2:
            lines.append(f"{cls} {(x + w / 2) / size:.6f} {(y + h / 2) / size:.6f} {w / size:.6f} {h / size:.6f}\n")
    # Lighting, haze, optics blur and sensor noise: what turns a clean render into this camera'size frame.
    f = img.astype(np.float32) / 255
    f = (f ** domain["gamma"] if domain["gamma"] != 1 else f) * (lmap * rng.uniform(0.94, 1.06)) + domain["haze"] * 0.7
    f = np.repeat(f.mean(2, keepdims=True), 3, 2) if domain.get("light") == "ir" else f  # monochrome night vision
    f = cv2.GaussianBlur(f, (0, 0), domain["blur"]) if domain["blur"] > 0.3 else f
    f += rng.standard_normal(f.shape, dtype=np.float32) * (domain["noise"] / 255)
    return np.clip(f * 255 + 0.5, 0, 255).astype(np.uint8), "".join(lines)

