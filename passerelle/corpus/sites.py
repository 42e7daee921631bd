"""The two simulated hospitals: case mix, writing style, identifier formats.

Site X is a large university hospital (CHU), site Y a smaller general hospital
(CH). They share the code tables; Y sees more geriatrics, obstetrics, trauma and
general medicine, X more cardiology, oncology, neurology and rare codes. Y writes
shorter letters with more abbreviations and its own words for the same findings.
Both hospitals are fictional.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from types import MappingProxyType

SECTION_KEYS: tuple[str, ...] = ("header", "motif", "antecedents", "examen", "conclusion", "actes")


@dataclass(frozen=True)
class SiteProfile:
    """Everything that makes one site's letters different from the other's."""

    site: str
    hospital: str
    address: str
    titles: Mapping[str, str]
    specialty_weight: Mapping[str, float]
    code_weight: Mapping[str, float]
    services: Mapping[str, str]
    phone_prefix: str
    ipp_prefix: str
    ipp_digits: int
    nir_spaced: bool
    synonyms: tuple[tuple[str, str], ...]
    abbreviation_rate: float
    typo_rate: float
    name_in_body_rate: float
    phone_in_body_rate: float
    label_noise_rate: float
    ambiguous_rate: float
    acts_as_labels: bool
    borrow_rate: float
    specific_conclusion_rate: float


SITE_X = SiteProfile(
    site="X",
    hospital="CHU de Montaigu",
    address="Hôpital Saint-Éloi, 12 boulevard des Tanneurs, 49320 Montaigu",
    titles=MappingProxyType(
        {
            "header": "COMPTE RENDU D'HOSPITALISATION",
            "motif": "Motif d'hospitalisation",
            "antecedents": "Antécédents",
            "examen": "Examen clinique à l'entrée",
            "conclusion": "Évolution et conclusion",
            "actes": "Actes réalisés",
        }
    ),
    specialty_weight=MappingProxyType(
        {
            "cardiologie": 2.2,
            "pneumologie": 1.0,
            "neurologie": 1.8,
            "gastro-entérologie": 1.0,
            "endocrinologie": 0.8,
            "néphrologie-urologie": 0.9,
            "orthopédie-traumatologie": 0.5,
            "obstétrique": 0.45,
            "oncologie": 2.2,
            "infectiologie": 0.8,
            "gériatrie": 0.25,
        }
    ),
    code_weight=MappingProxyType({"R53": 0.0, "G35": 2.0, "C79.3": 2.0, "I44.2": 1.5, "J46": 1.3}),
    services=MappingProxyType(
        {
            "cardiologie": "Cardiologie",
            "pneumologie": "Pneumologie",
            "neurologie": "Neurologie",
            "gastro-entérologie": "Hépato-gastro-entérologie",
            "endocrinologie": "Endocrinologie-diabétologie",
            "néphrologie-urologie": "Néphrologie",
            "orthopédie-traumatologie": "Chirurgie orthopédique et traumatologique",
            "obstétrique": "Gynécologie-obstétrique",
            "oncologie": "Oncologie médicale",
            "infectiologie": "Maladies infectieuses et tropicales",
            "gériatrie": "Gériatrie aiguë",
        }
    ),
    phone_prefix="02 41",
    ipp_prefix="40",
    ipp_digits=10,
    nir_spaced=True,
    synonyms=(),
    abbreviation_rate=0.12,
    typo_rate=0.008,
    name_in_body_rate=0.35,
    phone_in_body_rate=0.3,
    label_noise_rate=0.04,
    ambiguous_rate=0.08,
    acts_as_labels=True,
    borrow_rate=0.42,
    specific_conclusion_rate=0.55,
)

# Y's own words for what X writes in full (whole words, longest match first). The
# right-hand sides contain words X never writes.
_Y_SYNONYMS: tuple[tuple[str, str], ...] = (
    ("douleur thoracique constrictive", "DT oppressive"),
    ("douleur thoracique", "DT"),
    ("sus-décalage du segment ST", "sus-ST"),
    ("sous-décalage du segment ST", "sous-ST"),
    ("sus-décalage ST", "sus-ST"),
    ("segment ST", "ST"),
    ("altération de l'état général", "AEG"),
    ("sous antibiothérapie", "sous ATB"),
    ("antibiothérapie", "ATB"),
    ("radiographie pulmonaire", "RP"),
    ("radiographie", "radio"),
    ("scanner cérébral", "TDM cérébrale"),
    ("scanner", "TDM"),
    ("troponine", "tropo"),
    ("en air ambiant", "en AA"),
    ("d'évolution favorable", "évolution simple"),
    ("examen clinique sans particularité", "clinique RAS"),
    ("sans complication", "sans souci"),
    ("hyperleucocytose", "hyperGB"),
    ("réunion de concertation pluridisciplinaire", "RCP"),
    ("insuffisance cardiaque", "IC"),
    ("pression artérielle", "TA"),
    ("kinésithérapie", "kiné"),
    ("cœlioscopie", "coelio"),
    ("pneumopathie", "PNP"),
    ("Escherichia coli", "E. coli"),
    ("fracture", "fx"),
    ("infarctus cérébral", "AVC isch"),
    ("hémorragie digestive", "HD"),
    ("échographie", "écho"),
    ("antigénurie pneumocoque positive", "AgU pneumocoque +"),
    ("hémocultures", "HC"),
    ("prothèse totale de hanche", "PTH"),
    ("prothèse totale du genou", "PTG"),
    ("prothèse intermédiaire de hanche", "PIH"),
    ("diabète gestationnel", "DG"),
    ("anticoagulation", "anticoag"),
    ("anticoagulant oral direct", "AOD"),
    ("angioplastie", "ATL"),
    ("bronchodilatateurs", "BD"),
    ("corticothérapie", "CTC"),
    ("chimiothérapie", "chimio"),
    ("métastases", "métas"),
    ("adénocarcinome", "ADK"),
    ("cancer", "néo"),
    ("pancréatite aiguë", "PA"),
    ("lipasémie", "lipase"),
    ("glycémie capillaire", "dextro"),
    ("hyponatrémie", "hypoNa"),
    ("natrémie", "Na"),
    ("dermohypodermite", "DHB"),
    ("ponction lombaire", "PL"),
    ("syndrome", "sd"),
    ("chutes à répétition", "chutes répétées"),
    ("déshydratation extracellulaire", "DEC"),
    ("hospitalisation", "hospit"),
    ("insuffisance rénale", "IR"),
    ("fibrillation auriculaire", "ACFA"),
    ("accident vasculaire cérébral", "AVC"),
)

SITE_Y = SiteProfile(
    site="Y",
    hospital="Centre hospitalier de Valbrune",
    address="1 rue de l'Hôpital, 26170 Valbrune",
    titles=MappingProxyType(
        {
            "header": "COURRIER DE SORTIE",
            "motif": "Motif",
            "antecedents": "ATCD",
            "examen": "Clinique",
            "conclusion": "Évolution",
            "actes": "Actes",
        }
    ),
    specialty_weight=MappingProxyType(
        {
            "cardiologie": 0.9,
            "pneumologie": 1.2,
            "neurologie": 0.6,
            "gastro-entérologie": 1.0,
            "endocrinologie": 1.0,
            "néphrologie-urologie": 1.1,
            "orthopédie-traumatologie": 1.8,
            "obstétrique": 1.7,
            "oncologie": 0.45,
            "infectiologie": 1.3,
            "gériatrie": 2.4,
        }
    ),
    code_weight=MappingProxyType(
        {"G35": 0.0, "C79.3": 0.0, "I44.2": 0.5, "I63.5": 0.3, "Z51.1": 0.4, "J46": 0.6}
    ),
    services=MappingProxyType(
        {
            "cardiologie": "Cardiologie",
            "pneumologie": "Médecine polyvalente",
            "neurologie": "Médecine polyvalente",
            "gastro-entérologie": "Médecine polyvalente",
            "endocrinologie": "Médecine polyvalente",
            "néphrologie-urologie": "Médecine polyvalente",
            "orthopédie-traumatologie": "Chirurgie orthopédique",
            "obstétrique": "Maternité",
            "oncologie": "Médecine polyvalente",
            "infectiologie": "Médecine polyvalente",
            "gériatrie": "Court séjour gériatrique",
        }
    ),
    phone_prefix="04 75",
    ipp_prefix="7",
    ipp_digits=8,
    nir_spaced=False,
    synonyms=_Y_SYNONYMS,
    abbreviation_rate=0.6,
    typo_rate=0.02,
    name_in_body_rate=0.6,
    phone_in_body_rate=0.15,
    label_noise_rate=0.04,
    ambiguous_rate=0.1,
    acts_as_labels=False,
    borrow_rate=0.42,
    specific_conclusion_rate=0.55,
)

PROFILES: Mapping[str, SiteProfile] = MappingProxyType({"X": SITE_X, "Y": SITE_Y})
