"""The built-in samplers, each a planning function (host math on a float64 grid) and a loop.

Notation for a step from level i to i+1: ``a, s`` = alpha_i, sigma_i; ``an, sn`` = alpha_{i+1}, sigma_{i+1};
``lam`` = log(alpha/sigma); ``h = lam_{i+1} - lam_i``; ``D_i`` = the denoiser's x0 estimate at level i.
Every update is linear in the state and the recent ``D``s, so a plan is a table of coefficients.
"""

from __future__ import annotations

import numpy as np

from .registry import register

# ---------------------------------------------------------------------------------------------- helpers


def _ratio(num: float, den: float) -> float:
    """num/den where two infinite intervals (both starting at alpha 0) have ratio 1 in the limit."""
    if np.isinf(num) and np.isinf(den):
        return 1.0
    return num / den


def _check_choice(name: str, value, allowed) -> None:
    if value not in allowed:
        raise ValueError(f"{name} must be one of {list(allowed)}, got {value!r}")


def _combine(x, coefs_x, coefs_m, history):
    """``cx * x + sum_j cm[j] * history[j]`` (history: most recent D first)."""
    out = coefs_x * x
    for j, d in enumerate(history):
        out = out + coefs_m[j] * d
    return out


# ------------------------------------------------------------------- DDIM / Euler / ancestral (DDPM)


def _plan_ancestral(host, eta: float):
    """DDIM with noise fraction eta, in alpha/sigma form (eta 0: Euler; eta 1: DDPM posterior = ancestral).

    x_{i+1} = an*D + sqrt(sn^2 - c^2) * eps_hat + c * z,  eps_hat = (x - a*D)/s,  c = eta*sn*sqrt(1 - e^{-2h}).
    """
    if not (isinstance(eta, int | float) and 0 <= eta <= 1):
        raise ValueError(f"eta must be a number in [0, 1], got {eta!r}")
    a, s, lam = host.alphas, host.sigmas, host.log_snr
    an, sn = a[1:], s[1:]
    h = lam[1:] - lam[:-1]
    c = eta * sn * np.sqrt(-np.expm1(-2 * h))
    e = np.sqrt(np.maximum(sn**2 - c**2, 0.0))
    cx = e / s[:-1]
    cd = an - e * a[:-1] / s[:-1]
    return {"x": cx, "d": cd, "z": c}, {"noisy": (c > 0).tolist()}


def _loop_ancestral(denoiser, x, plan, generator):
    c, levels = plan.coefs, plan.levels
    for i in range(levels.steps):
        d = plan.denoise(denoiser, x, i)
        x = c["x"][i] * x + c["d"][i] * d
        if plan.static["noisy"][i]:
            x = x + c["z"][i] * plan.noise_like(x, generator)
    return x


def _plan_euler(host):
    return _plan_ancestral(host, 0.0)


def _plan_ddim(host, eta: float = 0.0):
    return _plan_ancestral(host, eta)


def _plan_euler_ancestral(host, eta: float = 1.0):
    return _plan_ancestral(host, eta)


def _plan_ddpm(host):
    return _plan_ancestral(host, 1.0)


register("euler", _plan_euler, _loop_ancestral, summary="Euler = DDIM (eta 0) = flow Euler; 1st order")
register("ddim", _plan_ddim, _loop_ancestral, stochastic=True, summary="DDIM with option eta")
register("euler_ancestral", _plan_euler_ancestral, _loop_ancestral, stochastic=True, summary="Euler ancestral")
register("ddpm", _plan_ddpm, _loop_ancestral, stochastic=True, summary="DDPM ancestral (posterior variance)")

# -------------------------------------------------------------------------------------------- Heun


def _plan_heun(host):
    """Heun's method on the probability-flow ODE in the coordinates y = x/f, tau = sigma/f.

    f = alpha for VP/VE grids (k-diffusion's and diffusers' Heun), f = alpha + sigma for flow grids
    (diffusers' flow-matching Heun). The last step to sigma 0 is a plain Euler step.
    """
    a, s = host.alphas, host.sigmas
    f = a + s if host.kind == "flow" else a
    with np.errstate(divide="ignore"):
        tau = s / f
        inv_tau = np.where(tau > 0, 1 / tau, 0.0)
    coefs = {
        "inv_f": 1 / f[:-1],
        "f_next": f[1:],
        "dt": tau[1:] - tau[:-1],
        "inv_tau": inv_tau[:-1],
        "inv_tau_next": inv_tau[1:],
    }
    return coefs, {"second": (s[1:] > 0).tolist()}


def _loop_heun(denoiser, x, plan, generator):
    c, levels = plan.coefs, plan.levels
    for i in range(levels.steps):
        y = x * c["inv_f"][i]
        d = (y - plan.denoise(denoiser, x, i)) * c["inv_tau"][i]
        y_next = y + c["dt"][i] * d
        if plan.static["second"][i]:
            d2 = (y_next - plan.denoise(denoiser, y_next * c["f_next"][i], i + 1)) * c["inv_tau_next"][i]
            y_next = y + c["dt"][i] * 0.5 * (d + d2)
        x = y_next * c["f_next"][i]
    return x


register("heun", _plan_heun, _loop_heun, summary="Heun (2nd order, 2 NFE per step but the last)")

# --------------------------------------------------------------------------------------------- LCM


def _plan_lcm(host):
    """Consistency multistep sampling: jump to the x0 estimate, re-noise to the next level with fresh noise."""
    an, sn = host.alphas[1:], host.sigmas[1:]
    return {"d": an, "z": sn}, {"noisy": (sn > 0).tolist()}


def _loop_lcm(denoiser, x, plan, generator):
    c, levels = plan.coefs, plan.levels
    for i in range(levels.steps):
        x = c["d"][i] * plan.denoise(denoiser, x, i)
        if plan.static["noisy"][i]:
            x = x + c["z"][i] * plan.noise_like(x, generator)
    return x


register("lcm", _plan_lcm, _loop_lcm, stochastic=True, summary="latent consistency model multistep")

# ------------------------------------------------------------------------ DPM-Solver++ (multistep)


def _multistep_orders(n: int, order: int, lower_order_final: bool, euler_at_final: bool, final_zero: bool):
    """diffusers' DPMSolverMultistep order per step: warm-up, and lower orders at the end of short runs."""
    orders = []
    for i in range(n):
        lower_final = i == n - 1 and (euler_at_final or (lower_order_final and n < 15) or final_zero)
        lower_second = i == n - 2 and lower_order_final and n < 15
        if order == 1 or i < 1 or lower_final:
            orders.append(1)
        elif order == 2 or i < 2 or lower_second:
            orders.append(2)
        else:
            orders.append(3)
    return orders


def _plan_dpmpp(host, order, solver_type, lower_order_final, euler_at_final, sde, third_order="diffusers"):
    """DPM-Solver++ (Lu et al. 2022) in data prediction, multistep, as diffusers' DPMSolverMultistep.

    Coefficients on x and on (D_i, D_{i-1}, D_{i-2}); the SDE variant adds sn*sqrt(1 - e^{-2h}) * z.
    ``third_order="diffusers"`` is the 3rd-order update of diffusers, k-diffusion and dpm-solver: its
    D2 = (D1_0 - D1_1)/(r0 + r1) estimates h^2 D''/2 where the phi_3 term needs h^2 D'', so it converges
    at order 2 (measured on the Gaussian-mixture oracle). ``"taylor"`` doubles D2: order 3.
    """
    _check_choice("solver_type", solver_type, ("midpoint", "heun"))
    _check_choice("third_order", third_order, ("diffusers", "taylor"))
    a, s, lam = host.alphas, host.sigmas, host.log_snr
    n = host.steps
    orders = _multistep_orders(n, order, lower_order_final, euler_at_final, s[-1] == 0)
    cx, cm, cz = np.zeros(n), np.zeros((n, 3)), np.zeros(n)
    for i, p in enumerate(orders):
        an, sn, h = a[i + 1], s[i + 1], lam[i + 1] - lam[i]
        if sde:
            q = -np.expm1(-2 * h)  # 1 - e^{-2h}
            cx[i] = sn / s[i] * np.exp(-h)
            p1 = an * q
            w2 = 0.5 * p1 if solver_type == "midpoint" else an * (q / (-2 * h) + 1)
            cz[i] = sn * np.sqrt(q)
        else:
            e = np.expm1(-h)
            cx[i] = sn / s[i]
            p1 = -an * e
            w2 = 0.5 * p1 if solver_type == "midpoint" else an * (e / h + 1)
        if p == 1:
            cm[i] = [p1, 0, 0]
        elif p == 2:
            r0 = _ratio(lam[i] - lam[i - 1], h)
            cm[i] = [p1 + w2 / r0, -w2 / r0, 0]
        else:
            e = np.expm1(-h)
            p2 = an * (e / h + 1)
            p3 = -an * ((e + h) / h**2 - 0.5)
            r0 = _ratio(lam[i] - lam[i - 1], h)
            r1 = _ratio(lam[i - 1] - lam[i - 2], h)
            u = np.array([1 / r0, -1 / r0, 0])  # D1_0 = (D_i - D_{i-1}) / r0
            v = np.array([0, 1 / r1, -1 / r1])  # D1_1 = (D_{i-1} - D_{i-2}) / r1
            d1 = u + r0 / (r0 + r1) * (u - v)
            d2 = (u - v) / (r0 + r1) * (2.0 if third_order == "taylor" else 1.0)
            cm[i] = p1 * np.array([1, 0, 0]) + p2 * d1 + p3 * d2
    coefs = {"x": cx, "m": cm}
    static = {"orders": orders}
    if sde:
        coefs["z"] = cz
    return coefs, static


def _loop_multistep(denoiser, x, plan, generator):
    c, levels = plan.coefs, plan.levels
    history = []
    for i in range(levels.steps):
        history = [plan.denoise(denoiser, x, i)] + history[:2]
        p = plan.static["orders"][i]
        x = _combine(x, c["x"][i], c["m"][i], history[:p])
        if "z" in c:
            x = x + c["z"][i] * plan.noise_like(x, generator)
    return x


def _plan_dpmpp_2m(host, solver_type="midpoint", lower_order_final=True, euler_at_final=False):
    return _plan_dpmpp(host, 2, solver_type, lower_order_final, euler_at_final, sde=False)


def _plan_dpmpp_3m(host, solver_type="midpoint", lower_order_final=True, euler_at_final=False, third_order="diffusers"):
    # solver_type applies to the 2nd-order warm-up step; third_order: see _plan_dpmpp
    return _plan_dpmpp(host, 3, solver_type, lower_order_final, euler_at_final, sde=False, third_order=third_order)


def _plan_dpmpp_2m_sde(host, solver_type="midpoint", lower_order_final=True, euler_at_final=False):
    return _plan_dpmpp(host, 2, solver_type, lower_order_final, euler_at_final, sde=True)


register("dpmpp_2m", _plan_dpmpp_2m, _loop_multistep, summary="DPM-Solver++(2M), 2nd order multistep")
register("dpmpp_3m", _plan_dpmpp_3m, _loop_multistep, summary="DPM-Solver++(3M), 3rd order multistep")
register("dpmpp_2m_sde", _plan_dpmpp_2m_sde, _loop_multistep, stochastic=True, summary="SDE-DPM-Solver++(2M)")

# ----------------------------------------------------------------------- DPM-Solver++ (singlestep)


def _singlestep_orders(n: int, lower_order_final: bool, final_zero: bool):
    """diffusers' DPMSolverSinglestep (order 2): levels alternate as start and midpoint of a 2nd-order step."""
    if lower_order_final:
        orders = [1, 2] * (n // 2 - 1) + [1, 1] if n % 2 == 0 else [1, 2] * (n // 2) + [1]
    else:
        if n % 2:
            raise ValueError(f"dpmpp_2s with lower_order_final=False needs an even number of steps, got {n}")
        orders = [1, 2] * (n // 2)
    if final_zero:
        orders[-1] = 1
    return orders


def _plan_dpmpp_2s(host, solver_type="midpoint", lower_order_final=True):
    """DPM-Solver++(2S): a 2nd-order step from level i-1 to i+1 through the midpoint level i.

    Order-1 steps save their start; the following order-2 step restarts from it using D_{i-1} and D_i,
    so n steps cost n model calls (as diffusers' DPMSolverSinglestepScheduler, solver_order=2).
    """
    _check_choice("solver_type", solver_type, ("midpoint", "heun"))
    a, s, lam = host.alphas, host.sigmas, host.log_snr
    n = host.steps
    orders = _singlestep_orders(n, lower_order_final, s[-1] == 0)
    cx, cm = np.zeros(n), np.zeros((n, 2))
    for i, p in enumerate(orders):
        start = i if p == 1 else i - 1
        an, sn = a[i + 1], s[i + 1]
        h = lam[i + 1] - lam[start]
        e = np.expm1(-h)
        cx[i] = sn / s[start]
        p1 = -an * e
        if p == 1:
            cm[i] = [p1, 0]
        else:
            r0 = _ratio(lam[i] - lam[start], h)
            w2 = 0.5 * p1 if solver_type == "midpoint" else an * (e / h + 1)
            cm[i] = [w2 / r0, p1 - w2 / r0]
    return {"x": cx, "m": cm}, {"orders": orders}


def _loop_singlestep(denoiser, x, plan, generator):
    c, levels = plan.coefs, plan.levels
    start, previous = x, None
    for i in range(levels.steps):
        d = plan.denoise(denoiser, x, i)
        if plan.static["orders"][i] == 1:
            start = x
            x = c["x"][i] * x + c["m"][i][0] * d
        else:
            x = c["x"][i] * start + c["m"][i][0] * d + c["m"][i][1] * previous
        previous = d
    return x


register("dpmpp_2s", _plan_dpmpp_2s, _loop_singlestep, summary="DPM-Solver++(2S), 2nd order singlestep")

# -------------------------------------------------------------------------------------- PNDM (PLMS)

_ADAMS_BASHFORTH = ([1.0], [3 / 2, -1 / 2], [23 / 12, -16 / 12, 5 / 12], [55 / 24, -59 / 24, 37 / 24, -9 / 24])


def _plan_pndm(host, combine="eps"):
    """PLMS (Liu et al. 2022, pseudo linear multistep) with the ``skip_prk_steps`` start Stable Diffusion 1.x
    ships, as diffusers' PNDMScheduler: DDIM's transfer x_{i+1} = an/a * x + (sn - an*s/a) * eps, with eps
    an Adams-Bashforth combination of the last (up to 4) model outputs. The first step of a run of two or
    more is a Heun step (a second call at the next level, the two averaged), which costs one call more.

    ``combine``: what the multistep history holds: ``"eps"`` (the method's own), or ``"v"`` (diffusers
    combines the model's raw outputs, so a v-prediction model's v, converted to eps after the combination).
    """
    _check_choice("combine", combine, ("eps", "v"))
    a, s = host.alphas, host.sigmas
    n = host.steps
    if not (s[:-1] > 0).all():
        raise ValueError("pndm needs a grid with noise at every level but the last (a VP grid)")
    norm = a**2 + s**2
    with np.errstate(divide="ignore", invalid="ignore"):
        qx = np.where(s > 0, (a if combine == "v" else 1.0) / s, 0.0)  # the history's quantity q from x and D
        qd = np.where(s > 0, -(norm if combine == "v" else a) / s, 0.0)
        cx = a[1:] / a[:-1]
    ce = s[1:] - a[1:] * s[:-1] / a[:-1]  # eps's coefficient in DDIM's transfer
    if combine == "v":  # eps = (a*v + s*x) / (a^2 + s^2) at the step's start
        cx, ce = cx + ce * s[:-1] / norm[:-1], ce * a[:-1] / norm[:-1]
    orders = [1] + [min(i + 1, 4) for i in range(1, n)]
    m = np.zeros((n, 4))
    for i, p in enumerate(orders):
        m[i, :p] = ce[i] * np.array(_ADAMS_BASHFORTH[p - 1])
    second = [i == 0 and n > 1 for i in range(n)]
    return {"qx": qx, "qd": qd, "x": cx, "m": m}, {"orders": orders, "second": second}


def _loop_pndm(denoiser, x, plan, generator):
    c, static = plan.coefs, plan.static
    history = []
    for i in range(plan.levels.steps):
        q = c["qx"][i] * x + c["qd"][i] * plan.denoise(denoiser, x, i)
        history = [q] + history[:3]
        step = _combine(x, c["x"][i], c["m"][i], history[: static["orders"][i]])
        if static["second"][i]:  # Heun's correction: the next level's output averaged in (not kept in history)
            q_next = c["qx"][i + 1] * step + c["qd"][i + 1] * plan.denoise(denoiser, step, i + 1)
            step = _combine(x, c["x"][i], c["m"][i], [0.5 * (q + q_next)])
        x = step
    return x


register("pndm", _plan_pndm, _loop_pndm, flow=False,
         summary="PNDM/PLMS (SD 1.x's scheduler), 4th order multistep, Heun start")

# ------------------------------------------------------------------------------------------- UniPC


def _unipc_rhs(hh: float, order: int, variant: str):
    """UniPC's B(h) and the right-hand side b_k = k! * phi_{k+1}(hh) / B(h), k = 1..order (Zhao et al.)."""
    phi1 = np.expm1(hh)
    b_h = hh if variant == "bh1" else phi1
    phi_k, fact, b = phi1 / hh - 1, 1, []
    for k in range(1, order + 1):
        b.append(phi_k * fact / b_h)
        fact *= k + 1
        phi_k = phi_k / hh - 1 / fact
    return phi1, b_h, np.array(b)


def _unipc_orders(n: int, order: int, lower_order_final: bool):
    orders = []
    for i in range(n):
        p = min(order, n - i) if lower_order_final else order
        orders.append(min(p, i + 1))  # warm-up: only i earlier outputs exist
    return orders


def _plan_unipc(host, variant="bh2", order=2, lower_order_final=True, disable_corrector=()):
    """UniPC (Zhao et al. 2023), data prediction: UniP-p predictor and UniC corrector, as diffusers' UniPC.

    The corrector at level i reuses the model output at i (computed at the uncorrected state), so it costs
    no model call; there is none after the last step.
    """
    _check_choice("variant", variant, ("bh1", "bh2"))
    _check_choice("order", order, (1, 2, 3))
    disabled = set(disable_corrector)
    a, s, lam = host.alphas, host.sigmas, host.log_snr
    n = host.steps
    orders = _unipc_orders(n, order, lower_order_final)
    px, pm = np.zeros(n), np.zeros((n, 3))
    qx, qm = np.zeros(n), np.zeros((n, 4))
    use_corrector = [i > 0 and (i - 1) not in disabled for i in range(n)]
    for i in range(n):
        # predictor from level i to i+1 with order p
        p, an, h = orders[i], a[i + 1], lam[i + 1] - lam[i]
        phi1, b_h, b = _unipc_rhs(-h, p, variant)
        rks = np.array([_ratio(lam[i - k] - lam[i], h) for k in range(1, p)] + [1.0])
        px[i] = s[i + 1] / s[i]
        pm[i, 0] = -an * phi1
        if p > 1:
            rhos = np.array([0.5]) if p == 2 else np.linalg.solve(np.vander(rks, increasing=True).T[:-1, :-1], b[:-1])
            for k in range(1, p):
                w = -an * b_h * rhos[k - 1] / rks[k - 1]
                pm[i, k] += w
                pm[i, 0] -= w
        if not use_corrector[i]:
            continue
        # corrector of level i from level i-1, with the order used by the predictor of step i-1
        q, ai, h = orders[i - 1], a[i], lam[i] - lam[i - 1]
        phi1, b_h, b = _unipc_rhs(-h, q, variant)
        rks = np.array([_ratio(lam[i - 1 - k] - lam[i - 1], h) for k in range(1, q)] + [1.0])
        rhos = np.array([0.5]) if q == 1 else np.linalg.solve(np.vander(rks, increasing=True).T, b)
        qx[i] = s[i] / s[i - 1]
        qm[i, 0] = -ai * b_h * rhos[-1]  # D_i
        qm[i, 1] = -ai * phi1 + ai * b_h * rhos[-1]  # D_{i-1}
        for k in range(1, q):
            w = -ai * b_h * rhos[k - 1] / rks[k - 1]
            qm[i, 1 + k] += w
            qm[i, 1] -= w
    coefs = {"px": px, "pm": pm, "qx": qx, "qm": qm}
    return coefs, {"orders": orders, "corrector": use_corrector}


def _loop_unipc(denoiser, x, plan, generator):
    c, levels, static = plan.coefs, plan.levels, plan.static
    history, previous_x = [], x
    for i in range(levels.steps):
        d = plan.denoise(denoiser, x, i)
        if static["corrector"][i]:
            x = _combine(previous_x, c["qx"][i], c["qm"][i], [d] + history[: static["orders"][i - 1]])
        history = [d] + history[:2]
        previous_x = x
        x = _combine(x, c["px"][i], c["pm"][i], history[: static["orders"][i]])
    return x


register("unipc", _plan_unipc, _loop_unipc, summary="UniPC predictor-corrector (bh1/bh2, order 1-3)")
