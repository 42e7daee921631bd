"""Deterministic generation of a site's synthetic PMSI corpus.

Every random draw comes from a ``random.Random`` seeded from a SHA-256 of
``(generator version, site, seed, purpose)``; each patient has its own stream, so
the same arguments give the same corpus, a larger ``n_stays`` extends a smaller one
(only the last patient's stays may differ), and planting canaries does not change
the content of the other patients' stays (only their identifiers' numbering).
"""

from __future__ import annotations

import hashlib
import random
from bisect import bisect_right
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import date, timedelta
from itertools import accumulate

from passerelle.corpus.codes import (
    ACT_BY_CODE,
    ASSOCIATED,
    DIAGNOSES,
    DIAGNOSIS_BY_CODE,
    Diagnosis,
)
from passerelle.corpus.model import Canary, Corpus, Identifiers, Sections, Stay, join_sections
from passerelle.corpus.noise import Rewriter, abbreviate, add_typos, capitalize_first
from passerelle.corpus.sites import PROFILES, SiteProfile
from passerelle.errors import CorpusError
from registry.identifiers import is_valid_nir, name_lists, nir_key

GENERATOR_VERSION = "1.1.0"

#: Canary sentence; ``{secret}`` is replaced by CANARY_LENGTH words of CANARY_ALPHABET.
#: The words are ordinary clinical words that every site's letters use for many
#: patients, so a vocabulary with a patient floor keeps them and a model can memorise
#: the combination (a secret out of the vocabulary could never be exposed). 16 words,
#: 6 drawn with repetition: 16**6 = 16.8 million secrets, 24 bits.
CANARY_TEMPLATE = "Mention de contrôle du dossier : {secret}."
CANARY_ALPHABET = ("ancienne années bilan brutale droit droite externe modérée normal notion "
                   "précision repos score supérieur élevé élevée")
CANARY_LENGTH = 6
CANARY_SEPARATOR = " "

#: Probability of 1, 2, ... 6 stays for a (non-canary) patient.
STAYS_PER_PATIENT_WEIGHTS: tuple[float, ...] = (0.55, 0.24, 0.11, 0.05, 0.03, 0.02)

_PERIOD_START = date(2019, 1, 1)
_PERIOD_DAYS = 6 * 365
_STAY_COUNT_CUM = tuple(accumulate(STAYS_PER_PATIENT_WEIGHTS))


def derived_rng(site: str, seed: int, purpose: str) -> random.Random:
    """A ``random.Random`` for one purpose, independent of PYTHONHASHSEED."""
    material = f"passerelle-corpus/{GENERATOR_VERSION}/{site}/{seed}/{purpose}".encode()
    return random.Random(int.from_bytes(hashlib.sha256(material).digest()[:16], "big"))  # noqa: S311 - reproducible synthetic data


# ------------------------------------------------------------------ site context


@dataclass(frozen=True)
class _Doctor:
    first: str
    last: str


@dataclass(frozen=True)
class _SiteContext:
    profile: SiteProfile
    codes: tuple[Diagnosis, ...]
    cum_weights: tuple[float, ...]
    doctors: dict[str, tuple[_Doctor, ...]]
    phones: dict[str, str]
    rewrite: Rewriter


def _site_context(profile: SiteProfile, seed: int) -> _SiteContext:
    rng = derived_rng(profile.site, seed, "site")
    codes: list[Diagnosis] = []
    weights: list[float] = []
    for d in DIAGNOSES:
        w = profile.specialty_weight[d.specialty] * d.weight * profile.code_weight.get(d.code, 1.0)
        if w > 0:
            codes.append(d)
            weights.append(w)
    names = name_lists()
    doctors: dict[str, tuple[_Doctor, ...]] = {}
    phones: dict[str, str] = {}
    for service in sorted(set(profile.services.values())):
        pool = names.male_first + names.female_first
        doctors[service] = tuple(
            _Doctor(rng.choice(pool), rng.choice(names.last)) for _ in range(3)
        )
        pairs = " ".join(f"{rng.randint(10, 99)}" for _ in range(3))
        phones[service] = f"{profile.phone_prefix} {pairs}"
    return _SiteContext(
        profile,
        tuple(codes),
        tuple(accumulate(weights)),
        doctors,
        phones,
        Rewriter(profile.synonyms),
    )


def _draw_code(ctx: _SiteContext, rng: random.Random) -> Diagnosis:
    x = rng.random() * ctx.cum_weights[-1]
    return ctx.codes[min(bisect_right(ctx.cum_weights, x), len(ctx.codes) - 1)]


def _compatible(d: Diagnosis, sex: str, age: int) -> bool:
    return (d.sex is None or d.sex == sex) and d.age[0] <= age <= d.age[1]


# ---------------------------------------------------------------------- patients


@dataclass(frozen=True)
class _Person:
    sex: str
    first: str
    last: str
    birth: date
    nir: str
    ipp: str
    chronic: tuple[str, ...]


@dataclass(frozen=True)
class _StayPlan:
    diagnosis: Diagnosis
    admission: date
    discharge: date
    age: int


def _age_at(birth: date, day: date) -> int:
    return day.year - birth.year - ((day.month, day.day) < (birth.month, birth.day))


def _make_nir(rng: random.Random, sex: str, birth: date) -> str:
    r = rng.random()
    if r < 0.015:
        place = rng.choice(("2A", "2B")) + f"{rng.randint(1, 366):03d}"
    elif r < 0.035:
        place = rng.choice(("971", "972", "973", "974")) + f"{rng.randint(1, 34):02d}"
    elif r < 0.085:
        place = "99" + f"{rng.randint(100, 990):03d}"  # born abroad: 99 + country code
    else:
        dept = rng.choice([n for n in range(1, 96) if n != 20])
        place = f"{dept:02d}{rng.randint(1, 800):03d}"
    nir13 = f"{'1' if sex == 'M' else '2'}{birth.year % 100:02d}{birth.month:02d}{place}"
    nir13 += f"{rng.randint(1, 999):03d}"
    nir = nir13 + f"{nir_key(nir13):02d}"
    if not is_valid_nir(nir):  # pragma: no cover - construction guarantees validity
        raise AssertionError(f"generated an invalid NIR {nir}")
    return nir


def _stay_count(rng: random.Random) -> int:
    return bisect_right(_STAY_COUNT_CUM, rng.random() * _STAY_COUNT_CUM[-1]) + 1


def _plan_patient(
    ctx: _SiteContext,
    rng: random.Random,
    n_stays: int,
    used_nir: set[str],
    used_ipp: set[str],
) -> tuple[_Person, list[_StayPlan]]:
    first = _draw_code(ctx, rng)
    sex = first.sex or ("F" if rng.random() < first.female_share else "M")
    lo, hi = first.age[0], min(first.age[1], 100)
    age0 = int(rng.triangular(lo, hi, lo + 0.65 * (hi - lo)))
    latest = max(0, _PERIOD_DAYS - 1 - 240 * (n_stays - 1))
    admission = _PERIOD_START + timedelta(days=rng.randint(0, latest))
    birth = date(admission.year - age0, admission.month, min(admission.day, 28))
    birth -= timedelta(days=rng.randint(0, 360))

    names = name_lists()
    first_name = rng.choice(names.female_first if sex == "F" else names.male_first)
    last_name = rng.choice(names.last)
    nir = _make_nir(rng, sex, birth)
    while nir in used_nir:
        nir = _make_nir(rng, sex, birth)
    used_nir.add(nir)
    profile = ctx.profile
    width = profile.ipp_digits - len(profile.ipp_prefix)
    ipp = profile.ipp_prefix + f"{rng.randrange(10**width):0{width}d}"
    while ipp in used_ipp:
        ipp = profile.ipp_prefix + f"{rng.randrange(10**width):0{width}d}"
    used_ipp.add(ipp)

    chronic: list[str] = []
    for assoc in ASSOCIATED:
        if age0 < assoc.min_age or (assoc.sex is not None and assoc.sex != sex):
            continue
        p = 0.06 + (0.35 if assoc.code in first.chronic else 0.0) + min(age0, 90) / 900
        if rng.random() < p:
            chronic.append(assoc.code)
    person = _Person(sex, first_name, last_name, birth, nir, ipp, tuple(chronic[:4]))

    plans: list[_StayPlan] = []
    diagnosis = first
    for i in range(n_stays):
        if i > 0:
            admission = plans[-1].discharge + timedelta(days=rng.randint(12, 420))
            age = _age_at(birth, admission)
            diagnosis = _next_diagnosis(ctx, rng, plans[-1].diagnosis, sex, age)
        days = rng.randint(*diagnosis.stay_days)
        plans.append(
            _StayPlan(
                diagnosis, admission, admission + timedelta(days=days), _age_at(birth, admission)
            )
        )
    return person, plans


def _next_diagnosis(
    ctx: _SiteContext, rng: random.Random, previous: Diagnosis, sex: str, age: int
) -> Diagnosis:
    if rng.random() < 0.3:
        candidates = [previous.code, *previous.siblings]
        d = DIAGNOSIS_BY_CODE[rng.choice(candidates)]
        if _compatible(d, sex, age) and any(c.code == d.code for c in ctx.codes):
            return d
    for _ in range(60):
        d = _draw_code(ctx, rng)
        if _compatible(d, sex, age):
            return d
    fallback = [d for d in ctx.codes if _compatible(d, sex, age)]
    return rng.choice(fallback) if fallback else previous


# ------------------------------------------------------------------------ letters


def _fr(day: date) -> str:
    return day.strftime("%d/%m/%Y")


def _display_name(person: _Person) -> str:
    return f"{person.last.upper()} {person.first}"


def _spaced_nir(nir: str) -> str:
    if nir[5:7] in ("97", "98"):
        parts = (nir[0], nir[1:3], nir[3:5], nir[5:8], nir[8:10], nir[10:13], nir[13:])
    else:
        parts = (nir[0], nir[1:3], nir[3:5], nir[5:7], nir[7:10], nir[10:13], nir[13:])
    return " ".join(parts)


class _Writer:
    """Renders the sections of one patient's stays with that patient's RNG."""

    def __init__(self, ctx: _SiteContext, rng: random.Random) -> None:
        self.ctx = ctx
        self.p = ctx.profile
        self.rng = rng

    def noisy(self, text: str) -> str:
        text = self.ctx.rewrite(text)
        text = abbreviate(text, self.p.abbreviation_rate, self.rng)
        return add_typos(text, self.p.typo_rate, self.rng)

    def phrase(self, d: Diagnosis, field: str) -> str:
        """One of ``d``'s phrases, or sometimes one of a sibling's (shared wording)."""
        rng = self.rng
        if d.siblings and rng.random() < self.p.borrow_rate:
            d = DIAGNOSIS_BY_CODE[rng.choice(d.siblings)]
        options: tuple[str, ...] = getattr(d, field)
        return rng.choice(options)

    def header(self, person: _Person, plan: _StayPlan, service: str, doctor: _Doctor) -> str:
        phone = self.ctx.phones[service]
        born = "Née le" if person.sex == "F" else "Né le"
        lines: tuple[str, ...]
        if self.p.site == "X":
            lines = (
                f"{self.p.hospital} — Service de {service.lower()}",
                self.p.address,
                f"Secrétariat : {phone}",
                f"Patient : {_display_name(person)}",
                f"{born} : {_fr(person.birth)}",
                f"N° de sécurité sociale : {_spaced_nir(person.nir)}",
                f"IPP : {person.ipp}",
                f"Hospitalisation du {_fr(plan.admission)} au {_fr(plan.discharge)}",
                f"Médecin responsable : Dr {doctor.first} {doctor.last.upper()}",
            )
        else:
            lines = (
                self.p.hospital,
                f"Service : {service} — Tél : {phone}",
                f"Nom : {person.last.upper()}  Prénom : {person.first}",
                f"Date de naissance : {_fr(person.birth)}",
                f"NIR : {person.nir}",
                f"N° IPP : {person.ipp}",
                f"Entrée le {_fr(plan.admission)}, sortie le {_fr(plan.discharge)}",
            )
        return "\n".join(lines)

    def motif(self, person: _Person, plan: _StayPlan, competitor: Diagnosis | None) -> str:
        rng = self.rng
        fem = person.sex == "F"
        what = self.noisy(self.phrase(plan.diagnosis, "motifs"))
        if rng.random() < self.p.name_in_body_rate:
            civ = (
                ("Madame" if fem else "Monsieur")
                if self.p.site == "X"
                else ("Mme" if fem else "M.")
            )
            who = f"{civ} {person.last.upper()}, {plan.age} ans,"
        else:
            who = f"{'Patiente' if fem else 'Patient'} de {plan.age} ans"
        e = "e" if fem else ""
        if self.p.site == "X":
            verb = f"est hospitalisé{e}" if who.endswith(",") else f"hospitalisé{e}"
        else:
            verb = f"adressé{e} par le SAU"
        text = f"{who} {verb} pour {what}."
        if competitor is not None:
            text += f" Notion de {self.noisy(rng.choice(competitor.motifs))}."
        return text

    def antecedents(self, person: _Person, previous: Sequence[_StayPlan]) -> str:
        rng = self.rng
        lines = []
        for code in person.chronic:
            assoc = next(a for a in ASSOCIATED if a.code == code)
            lines.append("- " + capitalize_first(self.noisy(rng.choice(assoc.phrases))))
        for prior in previous[-2:]:
            label = prior.diagnosis.label
            lines.append(
                "- "
                + capitalize_first(
                    self.noisy(
                        f"hospitalisation en {prior.admission.year} : {label[0].lower()}{label[1:]}"
                    )
                )
            )
        if not lines:
            return "Pas d'antécédent notable." if self.p.site == "X" else "Aucun."
        return "\n".join(lines)

    def examen(self, person: _Person, plan: _StayPlan, competitor: Diagnosis | None) -> str:
        rng = self.rng
        fem = person.sex == "F"
        sys_, dia = rng.randint(95, 175), rng.randint(50, 100)
        hr, spo2 = rng.randint(55, 125), rng.randint(88, 100)
        temp = f"{rng.choice((36, 37, 38, 39))},{rng.randint(0, 9)}"
        if self.p.site == "X":
            e = "e" if fem else ""
            vitals = (
                f"{'Patiente' if fem else 'Patient'} conscient{e}, orienté{e}. Pression artérielle "
                f"{sys_}/{dia} mmHg, fréquence cardiaque {hr}/min, SpO2 {spo2} % en air ambiant, "
                f"température {temp} °C."
            )
        else:
            vitals = f"TA {sys_}/{dia}, FC {hr}, SpO2 {spo2} % en AA, T° {temp}."
        findings = [self.phrase(plan.diagnosis, "examens")]
        if rng.random() < 0.5:
            findings.append(self.phrase(plan.diagnosis, "examens"))
        findings = list(dict.fromkeys(findings))
        if competitor is not None:
            findings.append(rng.choice(competitor.examens))
        body = " ".join(capitalize_first(self.noisy(f)) + "." for f in findings)
        return f"{vitals} {body}"

    def conclusion(
        self,
        plan: _StayPlan,
        service: str,
        doctor: _Doctor,
        canary_line: str | None,
    ) -> str:
        rng = self.rng
        d = plan.diagnosis
        r = rng.random()
        if r < self.p.specific_conclusion_rate:
            what = rng.choice(d.conclusions)
        elif r < (1 + self.p.specific_conclusion_rate) / 2:
            what = self.phrase(d, "conclusions")
        else:
            what = f"{self.phrase(d, 'motifs')}, prise en charge symptomatique"
        lines = [capitalize_first(self.noisy(what)) + "."]
        if self.p.site == "X":
            dest = rng.choice(
                (
                    f"Retour à domicile le {_fr(plan.discharge)}.",
                    f"Sortie le {_fr(plan.discharge)} vers un service de soins de suite.",
                    f"Retour à domicile le {_fr(plan.discharge)}, suivi par le médecin traitant.",
                )
            )
            signature = f"Dr {doctor.first} {doctor.last.upper()}, service de {service.lower()}"
            phone_line = f"Secrétariat du service : {self.ctx.phones[service]}"
        else:
            dest = rng.choice(
                (f"RAD le {_fr(plan.discharge)}.", "RAD, suivi MT.", "Sortie en SSR.")
            )
            signature = f"Dr {doctor.last.upper()}"
            phone_line = f"Tél service : {self.ctx.phones[service]}"
        lines.append(dest)
        if rng.random() < self.p.phone_in_body_rate:
            lines.append(phone_line)
        lines.append(signature)
        if canary_line is not None:
            lines.append(canary_line)
        return "\n".join(lines)

    def actes(self, plan: _StayPlan) -> tuple[tuple[str, ...], str]:
        rng = self.rng
        d = plan.diagnosis
        codes: list[str] = []
        for alternatives in d.acts:
            if rng.random() < d.act_rate:
                codes.append(rng.choice(alternatives))
        codes = list(dict.fromkeys(codes))
        if self.p.acts_as_labels:
            text = "\n".join(f"- {ACT_BY_CODE[c].label}" for c in codes) or "Aucun acte classant."
        else:
            text = capitalize_first(", ".join(ACT_BY_CODE[c].short for c in codes)) or "Néant."
        return tuple(codes), text


def _competitor(ctx: _SiteContext, rng: random.Random, d: Diagnosis, sex: str) -> Diagnosis:
    pool = [DIAGNOSIS_BY_CODE[c] for c in d.siblings]
    if not pool or rng.random() < 0.4:
        pool = [x for x in DIAGNOSES if x.specialty == d.specialty and x.code != d.code]
    pool = [x for x in pool if x.sex is None or x.sex == sex] or [
        x for x in DIAGNOSES if x.sex is None and x.code != d.code
    ]
    return rng.choice(pool)


def _noisy_code(rng: random.Random, d: Diagnosis) -> str:
    if d.siblings and rng.random() < 0.7:
        return rng.choice(d.siblings)
    while True:
        other = rng.choice(DIAGNOSES)
        if other.code != d.code:
            return other.code


@dataclass(frozen=True)
class _RenderedStay:
    plan: _StayPlan
    sections: Sections
    main: str
    acts: tuple[str, ...]
    label_noise: bool
    ambiguous: bool
    service: str


def _render_patient(
    ctx: _SiteContext,
    rng: random.Random,
    person: _Person,
    plans: Sequence[_StayPlan],
    canary_line: str | None,
) -> list[_RenderedStay]:
    writer = _Writer(ctx, rng)
    out: list[_RenderedStay] = []
    for i, plan in enumerate(plans):
        d = plan.diagnosis
        service = ctx.profile.services[d.specialty]
        doctor = rng.choice(ctx.doctors[service])
        label_noise = rng.random() < ctx.profile.label_noise_rate
        main = _noisy_code(rng, d) if label_noise else d.code
        ambiguous = rng.random() < ctx.profile.ambiguous_rate
        competitor = _competitor(ctx, rng, d, person.sex) if ambiguous else None
        acts, actes_text = writer.actes(plan)
        sections = Sections(
            header=writer.header(person, plan, service, doctor),
            motif=writer.motif(person, plan, competitor),
            antecedents=writer.antecedents(person, plans[:i]),
            examen=writer.examen(person, plan, competitor),
            conclusion=writer.conclusion(plan, service, doctor, canary_line),
            actes=actes_text,
        )
        out.append(_RenderedStay(plan, sections, main, acts, label_noise, ambiguous, service))
    return out


# -------------------------------------------------------------------- generation


def _check_int(name: str, value: object, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise CorpusError(f"{name} must be an integer, got {value!r}")
    if value < minimum:
        raise CorpusError(f"{name} must be at least {minimum}, got {value}")
    return value


def generate(
    site: str, n_stays: int, seed: int, canaries: int = 0, canary_repetitions: int = 1
) -> Corpus:
    """Generate ``n_stays`` ordinary stays for ``site`` plus ``canaries`` planted ones.

    Each canary belongs to a new patient who has ``canary_repetitions`` stays, each
    carrying the same secret sentence (:data:`CANARY_TEMPLATE`); canary patients are
    inserted at seeded positions among the others. The corpus therefore holds
    ``n_stays + canaries * canary_repetitions`` stays. Raises :class:`CorpusError`
    on an unknown site or out-of-range arguments.
    """
    if site not in PROFILES:
        raise CorpusError(f"unknown site {site!r}: expected one of {', '.join(PROFILES)}")
    _check_int("n_stays", n_stays, 1)
    _check_int("seed", seed, -(2**63))
    _check_int("canaries", canaries, 0)
    _check_int("canary_repetitions", canary_repetitions, 1)
    ctx = _site_context(PROFILES[site], seed)
    used_nir: set[str] = set()
    used_ipp: set[str] = set()

    # (rng, person, plans, canary secret or None), in final patient order.
    patients: list[tuple[random.Random, _Person, list[_StayPlan], str | None]] = []
    remaining, k = n_stays, 0
    while remaining > 0:
        rng = derived_rng(site, seed, f"patient/{k}")
        count = min(_stay_count(rng), remaining)
        person, plans = _plan_patient(ctx, rng, count, used_nir, used_ipp)
        patients.append((rng, person, plans, None))
        remaining -= count
        k += 1

    crng = derived_rng(site, seed, "canaries")
    canary_slots: list[tuple[int, int]] = []  # (position among regular patients, canary index)
    for j in range(canaries):
        symbols = [crng.choice(CANARY_ALPHABET.split()) for _ in range(CANARY_LENGTH)]
        canary_secret = CANARY_SEPARATOR.join(symbols)
        rng = derived_rng(site, seed, f"canary/{j}")
        person, plans = _plan_patient(ctx, rng, canary_repetitions, used_nir, used_ipp)
        canary_slots.append((crng.randint(0, len(patients)), j))
        patients.append((rng, person, plans, canary_secret))
    regular, planted = patients[: len(patients) - canaries], patients[len(patients) - canaries :]
    ordered: list[tuple[random.Random, _Person, list[_StayPlan], str | None]] = []
    slots = sorted(canary_slots)
    si = 0
    for pos in range(len(regular) + 1):
        while si < len(slots) and slots[si][0] == pos:
            ordered.append(planted[slots[si][1]])
            si += 1
        if pos < len(regular):
            ordered.append(regular[pos])

    stays: list[Stay] = []
    canary_records: list[tuple[int, Canary]] = []
    for pidx, (rng, person, plans, secret) in enumerate(ordered, start=1):
        patient_id = f"{site}-P{pidx:06d}"
        line = CANARY_TEMPLATE.format(secret=secret) if secret is not None else None
        rendered = _render_patient(ctx, rng, person, plans, line)
        ids: list[str] = []
        for r in rendered:
            stay_id = f"{site}-S{len(stays) + 1:06d}"
            ids.append(stay_id)
            stays.append(
                Stay(
                    stay_id=stay_id,
                    patient_id=patient_id,
                    site=site,
                    admission_date=r.plan.admission.isoformat(),
                    discharge_date=r.plan.discharge.isoformat(),
                    age=r.plan.age,
                    sex=person.sex,
                    specialty=r.plan.diagnosis.specialty,
                    text=join_sections(site, r.sections),
                    sections=r.sections,
                    main_diagnosis=r.main,
                    true_diagnosis=r.plan.diagnosis.code,
                    associated_diagnoses=person.chronic,
                    acts=r.acts,
                    label_noise=r.label_noise,
                    ambiguous=r.ambiguous,
                    canary=secret is not None,
                    identifiers=Identifiers(
                        name=_display_name(person),
                        nir=person.nir,
                        birth_date=person.birth.isoformat(),
                        ipp=person.ipp,
                    ),
                )
            )
        if secret is not None:
            j = next(j for (_, j) in canary_slots if planted[j][1] is person)
            canary_records.append(
                (
                    j,
                    Canary(
                        canary_id=f"{site}-C{j + 1:04d}",
                        stay_ids=tuple(ids),
                        patient_id=patient_id,
                        template=CANARY_TEMPLATE,
                        secret=secret,
                        alphabet=CANARY_ALPHABET,
                        length=CANARY_LENGTH,
                        separator=CANARY_SEPARATOR,
                    ),
                )
            )
    canary_records.sort(key=lambda item: item[0])
    return Corpus(site, seed, tuple(stays), tuple(c for _, c in canary_records))


def label_table() -> dict[str, str]:
    """CIM-10 code -> French label, for every main-diagnosis code."""
    return {d.code: d.label for d in DIAGNOSES}
