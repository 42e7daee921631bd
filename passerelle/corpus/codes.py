"""Code tables of the synthetic corpus: CIM-10 diagnoses and CCAM acts.

Diagnosis codes are CIM-10 codes at the three- or four-character level with their
French labels (the national PMSI extensions, fifth and sixth characters, are not
used). Act codes are CCAM codes; every one was checked against a public CCAM table
except ZBQK002, HEQE002, HHQE005 and JQGD012 (well-known codes). Clinical phrases are
written in the style of site X; site-specific wording is applied later
(:mod:`passerelle.corpus.sites`).
"""

from __future__ import annotations

from dataclasses import dataclass
from types import MappingProxyType
from typing import Literal

Sex = Literal["M", "F"]

SPECIALTIES: tuple[str, ...] = (
    "cardiologie",
    "pneumologie",
    "neurologie",
    "gastro-entérologie",
    "endocrinologie",
    "néphrologie-urologie",
    "orthopédie-traumatologie",
    "obstétrique",
    "oncologie",
    "infectiologie",
    "gériatrie",
)


@dataclass(frozen=True)
class Act:
    """A CCAM act: code, official label, and the short name used in letters."""

    code: str
    label: str
    short: str


@dataclass(frozen=True)
class Associated:
    """An associated diagnosis (comorbidity) and how letters mention it."""

    code: str
    label: str
    phrases: tuple[str, ...]
    min_age: int = 30
    sex: Sex | None = None


@dataclass(frozen=True)
class Diagnosis:
    """A main diagnosis and what the letters of its stays say.

    ``acts`` is a tuple of alternatives: for each inner tuple, one act may be drawn
    (with probability ``act_rate``). ``siblings`` are the codes it is confused with
    (label noise, ambiguous stays). ``chronic`` are associated codes it makes likely.
    """

    code: str
    label: str
    specialty: str
    motifs: tuple[str, ...]
    examens: tuple[str, ...]
    conclusions: tuple[str, ...]
    acts: tuple[tuple[str, ...], ...] = ()
    age: tuple[int, int] = (18, 95)
    sex: Sex | None = None
    female_share: float = 0.5
    siblings: tuple[str, ...] = ()
    stay_days: tuple[int, int] = (2, 8)
    chronic: tuple[str, ...] = ()
    act_rate: float = 0.7
    weight: float = 1.0


ACTS: tuple[Act, ...] = (
    Act("DEQP003", "Électrocardiographie sur au moins 12 dérivations", "ECG"),
    Act("ZBQK002", "Radiographie du thorax", "radiographie thoracique"),
    Act(
        "DZQM006",
        "Échographie-doppler transthoracique du coeur et des vaisseaux intrathoraciques",
        "échographie cardiaque transthoracique",
    ),
    Act(
        "DZQM005",
        "Échographie-doppler transthoracique du coeur et des vaisseaux intrathoraciques, "
        "au lit du malade",
        "échographie cardiaque au lit",
    ),
    Act("DZQN001", "Remnographie [IRM] morphologique du coeur", "IRM cardiaque"),
    Act(
        "DKRP004",
        "Épreuve d'effort sur tapis roulant ou bicyclette ergométrique, avec "
        "électrocardiographie discontinue",
        "épreuve d'effort",
    ),
    Act(
        "DKMD001",
        "Ressuscitation cardiorespiratoire avec intubation trachéale, en dehors d'un bloc "
        "médicotechnique",
        "réanimation cardiorespiratoire",
    ),
    Act(
        "EAQH002",
        "Scanographie des vaisseaux encéphaliques [Angioscanner cérébral]",
        "angioscanner cérébral",
    ),
    Act(
        "EAQJ001",
        "Remnographie des vaisseaux encéphaliques [Angio-IRM cérébrale]",
        "angio-IRM cérébrale",
    ),
    Act(
        "EAJF341",
        "Évacuation de thrombus d'artère intracrânienne par voie artérielle transcutanée",
        "thrombectomie mécanique",
    ),
    Act(
        "EANF002",
        "Fibrinolyse in situ suprasélective d'artère intracrânienne, par voie artérielle "
        "transcutanée",
        "fibrinolyse intra-artérielle",
    ),
    Act(
        "GEJE001",
        "Aspiration intrabronchique à visée thérapeutique, par fibroscopie [Fibroaspiration "
        "bronchique]",
        "fibroaspiration bronchique",
    ),
    Act("HMFC004", "Cholécystectomie, par coelioscopie", "cholécystectomie coelioscopique"),
    Act("HMFA007", "Cholécystectomie, par laparotomie", "cholécystectomie par laparotomie"),
    Act(
        "HMGE002",
        "Ablation de calcul de la voie biliaire principale, par oeso-gastro-duodénoscopie",
        "extraction endoscopique de calcul cholédocien",
    ),
    Act("HEQE002", "Endoscopie oeso-gastro-duodénale", "fibroscopie oeso-gastro-duodénale"),
    Act(
        "HHQE005",
        "Coloscopie totale, avec franchissement de l'orifice iléocolique",
        "coloscopie totale",
    ),
    Act(
        "ZZNL048",
        "Séance d'irradiation externe par accélérateur linéaire de puissance égale ou "
        "supérieure à 5 mégavolts [MV], équipé d'un collimateur multilame",
        "séance de radiothérapie",
    ),
    Act(
        "ZZHH008",
        "Biopsie d'un organe profond sur une cible, par voie transcutanée avec guidage "
        "scanographique",
        "biopsie scannoguidée",
    ),
    Act(
        "ZZHJ013",
        "Biopsie d'un organe profond sur une cible, par voie transcutanée avec guidage "
        "échographique",
        "biopsie échoguidée",
    ),
    Act(
        "ACQK001",
        "Scanographie du crâne et de son contenu, sans injection de produit de contraste",
        "scanner cérébral",
    ),
    Act(
        "ACQH003",
        "Scanographie du crâne et de son contenu, avec injection intraveineuse de produit "
        "de contraste",
        "scanner cérébral injecté",
    ),
    Act(
        "ACQN001",
        "Remnographie [IRM] du crâne et de son contenu, sans injection intraveineuse de "
        "produit de contraste",
        "IRM cérébrale",
    ),
    Act(
        "ACQJ001",
        "Remnographie [IRM] du crâne et de son contenu avec étude de la viabilité du "
        "parenchyme cérébral par imagerie de diffusion et de perfusion, avec remnographie "
        "des vaisseaux [angio-IRM] cervicocéphaliques",
        "IRM de diffusion et de perfusion",
    ),
    Act(
        "ACQJ002",
        "Remnographie [IRM] du crâne et de son contenu, avec injection intraveineuse de "
        "produit de contraste",
        "IRM cérébrale injectée",
    ),
    Act("ZCQK002", "Radiographie de l'abdomen sans préparation", "abdomen sans préparation"),
    Act(
        "ZCQK004",
        "Scanographie de l'abdomen et du petit bassin [pelvis], sans injection "
        "intraveineuse de produit de contraste",
        "scanner abdominopelvien",
    ),
    Act("ZCQM008", "Échographie transcutanée de l'abdomen", "échographie abdominale"),
    Act(
        "ZCQM006",
        "Échographie transcutanée de l'étage supérieur de l'abdomen",
        "échographie hépatobiliaire",
    ),
    Act(
        "ZCQM003",
        "Échographie transcutanée du petit bassin [pelvis] féminin",
        "échographie pelvienne",
    ),
    Act(
        "ZCQJ006",
        "Échographie transcutanée avec échographie par voie rectale et/ou vaginale [par "
        "voie cavitaire] du petit bassin [pelvis] féminin",
        "échographie endovaginale",
    ),
    Act(
        "ZCQN001",
        "Remnographie [IRM] de l'abdomen et du petit bassin [pelvis], sans injection "
        "intraveineuse de produit de contraste",
        "IRM abdominopelvienne",
    ),
    Act(
        "JQGA002",
        "Accouchement par césarienne programmée, par laparotomie",
        "césarienne programmée",
    ),
    Act(
        "JQGA003",
        "Accouchement par césarienne au cours du travail, par laparotomie",
        "césarienne en cours de travail",
    ),
    Act(
        "JQGA004",
        "Accouchement par césarienne en urgence en dehors du travail, par laparotomie",
        "césarienne en urgence",
    ),
    Act(
        "JQGD010",
        "Accouchement céphalique unique par voie naturelle, chez une primipare",
        "accouchement par voie basse",
    ),
    Act(
        "JQGD012",
        "Accouchement céphalique unique par voie naturelle, chez une multipare",
        "accouchement par voie basse",
    ),
    Act("KCFA005", "Thyroïdectomie totale, par cervicotomie", "thyroïdectomie totale"),
)

ASSOCIATED: tuple[Associated, ...] = (
    Associated(
        "I10",
        "Hypertension essentielle (primitive)",
        ("hypertension artérielle traitée", "hypertension artérielle ancienne"),
        min_age=35,
    ),
    Associated(
        "E11.9",
        "Diabète sucré de type 2, sans complication",
        ("diabète de type 2 sous metformine", "diabète de type 2 non insulinotraité"),
        min_age=35,
    ),
    Associated(
        "E78.0",
        "Hypercholestérolémie essentielle",
        ("hypercholestérolémie sous statine", "dyslipidémie traitée"),
        min_age=35,
    ),
    Associated(
        "N18.3",
        "Maladie rénale chronique, stade 3",
        ("insuffisance rénale chronique stade 3", "insuffisance rénale chronique modérée"),
        min_age=55,
    ),
    Associated(
        "F17.1",
        "Troubles mentaux et du comportement liés à l'utilisation de tabac : "
        "utilisation nocive pour la santé",
        ("tabagisme actif à 30 paquets-années", "tabagisme actif non sevré"),
        min_age=18,
    ),
    Associated(
        "F10.2",
        "Troubles mentaux et du comportement liés à l'utilisation d'alcool : "
        "syndrome de dépendance",
        ("éthylisme chronique", "dépendance à l'alcool"),
        min_age=25,
    ),
    Associated("E66.9", "Obésité, sans précision", ("obésité", "obésité avec IMC à 34"), 18),
    Associated(
        "I25.2",
        "Infarctus du myocarde ancien",
        ("antécédent d'infarctus du myocarde stenté", "cardiopathie ischémique stentée"),
        min_age=45,
    ),
    Associated(
        "J44.9",
        "Maladie pulmonaire obstructive chronique, sans précision",
        ("bronchopneumopathie chronique obstructive", "BPCO stade 2"),
        min_age=45,
    ),
    Associated(
        "F03",
        "Démence, sans précision",
        ("troubles cognitifs évolués", "syndrome démentiel"),
        min_age=70,
    ),
    Associated(
        "E03.9",
        "Hypothyroïdie, sans précision",
        ("hypothyroïdie substituée", "hypothyroïdie sous lévothyroxine"),
        min_age=30,
    ),
    Associated("D64.9", "Anémie, sans précision", ("anémie chronique", "anémie modérée"), 40),
    Associated(
        "Z95.0",
        "Présence d'un stimulateur cardiaque",
        ("porteur d'un stimulateur cardiaque", "pacemaker double chambre"),
        min_age=60,
    ),
    Associated(
        "K21.9",
        "Reflux gastro-œsophagien sans œsophagite",
        ("reflux gastro-œsophagien", "reflux gastro-œsophagien sous IPP"),
        min_age=25,
    ),
    Associated(
        "G47.3",
        "Apnée du sommeil",
        ("syndrome d'apnées du sommeil appareillé", "apnées du sommeil sous PPC"),
        min_age=35,
    ),
    Associated(
        "I48.9",
        "Fibrillation et flutter auriculaires, sans précision",
        ("fibrillation auriculaire anticoagulée", "fibrillation auriculaire permanente"),
        min_age=55,
    ),
)

_SCA_DOULEUR = "douleur thoracique constrictive récidivante au repos"
_SCA_ST = "syndrome coronarien aigu avec sus-décalage du segment ST"
_PNP_MOTIF = "fièvre et toux productive"
_PNP_AEG = "dyspnée fébrile avec altération de l'état général"
_PNP_TOUX = "toux avec expectoration purulente et frissons"
_BPCO = "exacerbation de bronchopneumopathie chronique obstructive"
_BPCO_DYSP = "dyspnée et augmentation du volume des expectorations"
_AVC_DEF = "déficit brutal de l'hémicorps droit"
_AVC_APHASIE = "aphasie d'installation brutale"
_HCD = "douleur de l'hypochondre droit fébrile"
_PANC = "douleur épigastrique transfixiante"
_PANC_DOS = "douleur abdominale brutale irradiant dans le dos"
_LIPASE = "lipasémie supérieure à trois fois la normale"
_BRULURES = "brûlures mictionnelles et fièvre"
_ECBU = "ECBU : Escherichia coli supérieur à 10 puissance 5"
_CHUTE = "chute de sa hauteur avec impotence du membre inférieur"
_CHUTE_DOM = "chute mécanique à domicile"
_ROT_EXT = "raccourcissement et rotation externe du membre inférieur"
_MARCHE = "périmètre de marche limité"
_BNP = "BNP très élevé"
_MURPHY = "signe de Murphy positif"
_CONVULSION = "crise convulsive généralisée"

_CARDIO = (("DEQP003",), ("DZQM006",), ("ZBQK002",))
_PNEUMO = (("ZBQK002",),)

DIAGNOSES: tuple[Diagnosis, ...] = (
    # ----------------------------------------------------------------- cardiologie
    Diagnosis(
        "I21.0",
        "Infarctus transmural aigu du myocarde, de la paroi antérieure",
        "cardiologie",
        (
            "douleur thoracique constrictive prolongée irradiant au bras gauche",
            "douleur thoracique constrictive au repos depuis deux heures",
            _SCA_ST,
        ),
        (
            "ECG : sus-décalage du segment ST en antérieur de V1 à V4",
            "sus-décalage ST antéroseptal avec image en miroir inférieure",
            "troponine très élevée, pas de signe d'insuffisance cardiaque",
        ),
        (
            "infarctus du myocarde antérieur, occlusion de l'IVA proximale traitée par "
            "angioplastie avec pose d'un stent actif",
            "infarctus antérieur étendu revascularisé, hypokinésie antérieure à l'échographie",
            "SCA ST+ antérieur traité par angioplastie primaire de l'interventriculaire antérieure",
        ),
        (*_CARDIO, ("DKMD001",)),
        age=(35, 92),
        female_share=0.3,
        siblings=("I21.1", "I21.4", "I20.0"),
        stay_days=(3, 8),
        chronic=("I10", "E78.0", "F17.1", "E11.9"),
        weight=1.2,
    ),
    Diagnosis(
        "I21.1",
        "Infarctus transmural aigu du myocarde, de la paroi inférieure",
        "cardiologie",
        (
            "douleur thoracique constrictive avec malaise et sueurs",
            "douleur épigastrique atypique avec nausées chez un patient coronarien",
            _SCA_ST,
        ),
        (
            "ECG : sus-décalage du segment ST en inférieur DII DIII aVF",
            "bradycardie sinusale, sus-décalage ST inférieur avec miroir en DI aVL",
            "troponine très élevée, extension au ventricule droit recherchée",
        ),
        (
            "infarctus du myocarde inférieur, occlusion de la coronaire droite traitée par "
            "angioplastie et stent",
            "infarctus inférieur revascularisé, akinésie inférieure à l'échographie",
            "SCA ST+ inférieur traité par angioplastie primaire de la coronaire droite",
        ),
        _CARDIO,
        age=(35, 92),
        female_share=0.3,
        siblings=("I21.0", "I21.4"),
        stay_days=(3, 8),
        chronic=("I10", "E78.0", "F17.1", "E11.9"),
    ),
    Diagnosis(
        "I21.4",
        "Infarctus sous-endocardique aigu du myocarde",
        "cardiologie",
        (
            _SCA_DOULEUR,
            "douleur thoracique constrictive avec élévation de la troponine",
            "syndrome coronarien aigu sans sus-décalage du segment ST",
        ),
        (
            "ECG : sous-décalage du segment ST en latéral sans sus-décalage",
            "ondes T négatives en antérieur, troponine élevée avec cinétique positive",
            "pas de sus-décalage du segment ST, troponine élevée",
        ),
        (
            "infarctus sans sus-décalage du segment ST, lésion de la circonflexe traitée par "
            "angioplastie",
            "NSTEMI traité par angioplastie différée de la circonflexe",
            "infarctus sous-endocardique, double antiagrégation plaquettaire instaurée",
        ),
        _CARDIO,
        age=(40, 95),
        female_share=0.35,
        siblings=("I20.0", "I21.0", "I21.1"),
        stay_days=(3, 7),
        chronic=("I10", "E78.0", "E11.9", "N18.3"),
        weight=1.2,
    ),
    Diagnosis(
        "I20.0",
        "Angine de poitrine instable",
        "cardiologie",
        (
            _SCA_DOULEUR,
            "angor de repos d'apparition récente",
            "aggravation d'un angor d'effort devenu de repos",
        ),
        (
            "ECG : ondes T négatives transitoires en antérieur, sans sus-décalage",
            "troponine négative à deux reprises",
            "pas de sus-décalage du segment ST, troponine négative",
        ),
        (
            "angor instable, sténose serrée de l'IVA traitée par angioplastie",
            "syndrome coronarien aigu sans élévation de la troponine, épreuve d'effort positive",
            "angor instable stabilisé sous traitement médical",
        ),
        (*_CARDIO, ("DKRP004",)),
        age=(40, 92),
        female_share=0.35,
        siblings=("I21.4",),
        stay_days=(2, 5),
        chronic=("I10", "E78.0", "I25.2"),
    ),
    Diagnosis(
        "I50.1",
        "Insuffisance ventriculaire gauche",
        "cardiologie",
        (
            "dyspnée aiguë avec orthopnée",
            "œdème aigu du poumon",
            "dyspnée brutale nocturne avec grésillement laryngé",
        ),
        (
            "crépitants bilatéraux aux deux bases, pas d'œdème des membres inférieurs",
            "radiographie : œdème alvéolaire bilatéral en ailes de papillon",
            _BNP + ", hypertension artérielle à l'admission",
        ),
        (
            "œdème aigu du poumon cardiogénique sur poussée hypertensive, amélioration sous "
            "diurétiques intraveineux",
            "insuffisance ventriculaire gauche aiguë, fraction d'éjection altérée à 35 %",
            "décompensation cardiaque gauche, régression rapide sous furosémide",
        ),
        (("DEQP003",), ("ZBQK002",), ("DZQM006", "DZQM005")),
        age=(50, 98),
        siblings=("I50.0",),
        stay_days=(4, 12),
        chronic=("I10", "E11.9", "N18.3", "I48.9"),
        weight=1.1,
    ),
    Diagnosis(
        "I50.0",
        "Insuffisance cardiaque congestive",
        "cardiologie",
        (
            "dyspnée d'effort progressive et prise de poids",
            "œdèmes des membres inférieurs et dyspnée",
            "décompensation cardiaque globale",
        ),
        (
            "œdèmes bilatéraux des membres inférieurs prenant le godet, turgescence jugulaire",
            "crépitants aux bases et hépatomégalie douloureuse",
            _BNP + ", épanchement pleural bilatéral",
        ),
        (
            "insuffisance cardiaque congestive globale, perte de 5 kg sous diurétiques",
            "décompensation cardiaque globale sur cardiopathie ischémique",
            "insuffisance cardiaque globale, éducation thérapeutique et suivi rapproché",
        ),
        (("DEQP003",), ("ZBQK002",), ("DZQM006", "DZQM005")),
        age=(55, 110),
        siblings=("I50.1",),
        stay_days=(5, 15),
        chronic=("I10", "I25.2", "N18.3", "I48.9", "E11.9"),
        weight=1.3,
    ),
    Diagnosis(
        "I48.0",
        "Fibrillation auriculaire paroxystique",
        "cardiologie",
        (
            "palpitations d'apparition brutale",
            "palpitations et dyspnée depuis la veille",
            "découverte d'un rythme irrégulier",
        ),
        (
            "ECG : fibrillation auriculaire rapide à 140/min",
            "rythme cardiaque irrégulier, pas de signe d'insuffisance cardiaque",
            "échographie : oreillette gauche dilatée, pas de thrombus",
        ),
        (
            "fibrillation auriculaire paroxystique réduite spontanément, anticoagulation instaurée",
            "accès de fibrillation auriculaire paroxystique, cardioversion médicamenteuse par "
            "amiodarone",
            "fibrillation auriculaire paroxystique, score CHA2DS2-VASc à 3, anticoagulation orale",
        ),
        (("DEQP003",), ("DZQM006",)),
        age=(40, 95),
        siblings=("I50.1",),
        stay_days=(1, 4),
        chronic=("I10", "E66.9", "G47.3"),
    ),
    Diagnosis(
        "I44.2",
        "Bloc auriculoventriculaire complet",
        "cardiologie",
        (
            "malaises avec perte de connaissance brève",
            "bradycardie sévère découverte par le médecin traitant",
            "syncope à l'emporte-pièce",
        ),
        (
            "ECG : bloc auriculoventriculaire complet avec échappement ventriculaire à 35/min",
            "bradycardie à 30/min bien tolérée au repos",
            "dissociation auriculoventriculaire complète",
        ),
        (
            "bloc auriculoventriculaire complet, implantation d'un stimulateur cardiaque double "
            "chambre",
            "bloc auriculoventriculaire de haut degré appareillé par pacemaker",
            "BAV complet dégénératif, pose de pacemaker sans complication",
        ),
        (("DEQP003",), ("DZQM006",)),
        age=(60, 98),
        siblings=("I48.0",),
        stay_days=(2, 5),
        chronic=("I10", "N18.3"),
        weight=0.5,
    ),
    Diagnosis(
        "I26.9",
        "Embolie pulmonaire, sans mention de cœur pulmonaire aigu",
        "cardiologie",
        (
            "dyspnée brutale et douleur thoracique latérale",
            "douleur thoracique pleurale et hémoptysie",
            "dyspnée aiguë après un voyage prolongé",
        ),
        (
            "tachycardie, SpO2 à 89 % en air ambiant, mollet droit douloureux",
            "angioscanner thoracique : embolie pulmonaire bilatérale proximale",
            "D-dimères élevés, ventricule droit non dilaté",
        ),
        (
            "embolie pulmonaire sans cœur pulmonaire aigu, relais par anticoagulant oral direct",
            "embolie pulmonaire bilatérale de risque intermédiaire faible, anticoagulation "
            "curative",
            "embolie pulmonaire traitée par héparine puis anticoagulant oral",
        ),
        _CARDIO,
        age=(20, 95),
        siblings=("J18.9", "J93.1"),
        stay_days=(3, 8),
        chronic=("E66.9",),
    ),
    # ----------------------------------------------------------------- pneumologie
    Diagnosis(
        "J18.9",
        "Pneumopathie, sans précision",
        "pneumologie",
        (_PNP_MOTIF, _PNP_AEG, "toux fébrile depuis cinq jours"),
        (
            "crépitants en foyer à la base droite",
            "radiographie : opacité alvéolaire de la base droite",
            "CRP élevée, hyperleucocytose",
        ),
        (
            "pneumopathie communautaire sans germe identifié, amoxicilline-acide clavulanique",
            "pneumopathie de la base droite d'évolution favorable sous antibiothérapie",
            "pneumopathie aiguë communautaire, hémocultures négatives",
        ),
        _PNEUMO,
        age=(18, 110),
        siblings=("J15.9", "J13", "J11.1"),
        stay_days=(3, 9),
        chronic=("J44.9", "F17.1", "I10"),
        weight=1.4,
    ),
    Diagnosis(
        "J15.9",
        "Pneumopathie bactérienne, sans précision",
        "pneumologie",
        (_PNP_MOTIF, _PNP_TOUX, _PNP_AEG),
        (
            "crépitants en foyer à la base gauche",
            "radiographie : condensation lobaire inférieure gauche",
            "CRP très élevée, procalcitonine positive",
        ),
        (
            "pneumopathie bactérienne, examen des crachats non contributif, ceftriaxone",
            "pneumopathie bactérienne lobaire, apyrexie en 48 heures",
            "pneumopathie bactérienne sans germe documenté, antibiothérapie probabiliste",
        ),
        _PNEUMO,
        age=(18, 99),
        siblings=("J18.9", "J13"),
        stay_days=(3, 9),
        chronic=("J44.9", "F17.1", "E11.9"),
    ),
    Diagnosis(
        "J13",
        "Pneumonie due à Streptococcus pneumoniae",
        "pneumologie",
        (
            "fièvre brutale à 40 °C avec frissons",
            "douleur basithoracique et fièvre élevée",
            _PNP_TOUX,
        ),
        (
            "souffle tubaire à droite",
            "antigénurie pneumocoque positive",
            "radiographie : pneumopathie lobaire franche",
        ),
        (
            "pneumonie à pneumocoque, antigénurie positive, amoxicilline à forte dose",
            "pneumopathie franche lobaire aiguë, hémocultures positives à Streptococcus pneumoniae",
            "pneumococcie pulmonaire d'évolution favorable",
        ),
        _PNEUMO,
        age=(18, 99),
        siblings=("J15.9", "J18.9"),
        stay_days=(3, 9),
        chronic=("F10.2", "F17.1"),
        weight=0.7,
    ),
    Diagnosis(
        "J44.1",
        "Maladie pulmonaire obstructive chronique avec épisodes aigus, sans précision",
        "pneumologie",
        ("majoration de la dyspnée chez un patient BPCO", _BPCO_DYSP, _BPCO),
        (
            "sibilants diffus, freinage expiratoire",
            "gaz du sang : hypoxémie avec hypercapnie modérée",
            "distension thoracique, pas de foyer radiologique",
        ),
        (
            "exacerbation de BPCO sans foyer infectieux, corticothérapie courte et aérosols",
            "décompensation de BPCO, amélioration sous bronchodilatateurs",
            "exacerbation aiguë de BPCO, réhabilitation respiratoire proposée",
        ),
        (("ZBQK002",), ("DEQP003",)),
        age=(45, 95),
        female_share=0.35,
        siblings=("J44.0",),
        stay_days=(4, 12),
        chronic=("J44.9", "F17.1", "I10"),
    ),
    Diagnosis(
        "J44.0",
        "Maladie pulmonaire obstructive chronique avec infection aiguë des voies "
        "respiratoires inférieures",
        "pneumologie",
        (_BPCO, "fièvre et expectorations purulentes chez un patient BPCO", _BPCO_DYSP),
        (
            "sibilants et ronchi diffus",
            "radiographie : foyer de la base droite",
            "CRP élevée, expectoration purulente",
        ),
        (
            "exacerbation de BPCO d'origine infectieuse, antibiothérapie et corticothérapie",
            "BPCO surinfectée, amélioration sous amoxicilline",
            "exacerbation infectieuse de BPCO, kinésithérapie respiratoire",
        ),
        (("ZBQK002",), ("GEJE001",)),
        age=(45, 95),
        female_share=0.35,
        siblings=("J44.1", "J18.9"),
        stay_days=(4, 12),
        chronic=("J44.9", "F17.1"),
    ),
    Diagnosis(
        "J46",
        "État de mal asthmatique",
        "pneumologie",
        (
            "crise d'asthme sévère résistante aux bronchodilatateurs",
            "dyspnée sifflante aiguë chez une asthmatique connue",
            "asthme aigu grave",
        ),
        (
            "silence auscultatoire, débit expiratoire de pointe effondré",
            "impossibilité de parler, tirage sus-claviculaire",
            "sibilants diffus, polypnée à 30/min",
        ),
        (
            "asthme aigu grave, nébulisations de salbutamol et corticothérapie systémique",
            "état de mal asthmatique résolutif, relais par traitement de fond",
            "crise d'asthme sévère, éducation à la technique d'inhalation",
        ),
        _PNEUMO,
        age=(12, 65),
        female_share=0.6,
        siblings=("J44.1",),
        stay_days=(2, 6),
        weight=0.5,
    ),
    Diagnosis(
        "J93.1",
        "Autres pneumothorax spontanés",
        "pneumologie",
        (
            "douleur thoracique brutale et dyspnée chez un sujet jeune",
            "point de côté brutal",
            "dyspnée soudaine au repos",
        ),
        (
            "abolition du murmure vésiculaire à droite, tympanisme",
            "radiographie : pneumothorax complet droit",
            "décollement pleural apical",
        ),
        (
            "pneumothorax spontané idiopathique drainé, ablation du drain à J3",
            "pneumothorax spontané récidivant, exsufflation efficace",
            "pneumothorax spontané, surveillance radiologique",
        ),
        _PNEUMO,
        age=(16, 50),
        female_share=0.2,
        siblings=("I26.9",),
        stay_days=(2, 6),
        chronic=("F17.1",),
        weight=0.5,
    ),
    # ------------------------------------------------------------------ neurologie
    Diagnosis(
        "I63.9",
        "Infarctus cérébral, sans précision",
        "neurologie",
        (_AVC_DEF, _AVC_APHASIE, "trouble de la parole et faiblesse du bras gauche"),
        (
            "hémiparésie droite avec aphasie, score NIHSS à 8",
            "IRM cérébrale : lésion ischémique récente en diffusion",
            "paralysie faciale centrale, déficit brachial",
        ),
        (
            "accident vasculaire cérébral ischémique, bilan étiologique négatif",
            "infarctus cérébral, rééducation orthophonique et kinésithérapie",
            "AVC ischémique sans cause retrouvée, antiagrégant plaquettaire et statine",
        ),
        (("ACQK001",), ("ACQN001",), ("DEQP003",), ("DZQM006",)),
        age=(40, 99),
        siblings=("I63.5", "G45.9", "I61.9"),
        stay_days=(5, 14),
        chronic=("I10", "E11.9", "E78.0", "I48.9"),
        weight=1.3,
    ),
    Diagnosis(
        "I63.5",
        "Infarctus cérébral dû à une occlusion ou sténose, de mécanisme non précisé, des "
        "artères cérébrales",
        "neurologie",
        (_AVC_DEF, "hémiplégie gauche brutale", _AVC_APHASIE),
        (
            "angio-IRM : occlusion de l'artère cérébrale moyenne gauche",
            "IRM cérébrale : infarctus sylvien étendu en diffusion",
            "score NIHSS à 14",
        ),
        (
            "infarctus sylvien par occlusion de l'artère cérébrale moyenne, thrombectomie "
            "mécanique",
            "AVC ischémique avec occlusion proximale, thrombolyse intraveineuse puis thrombectomie",
            "infarctus cérébral sur occlusion artérielle, recanalisation partielle",
        ),
        (("ACQJ001",), ("EAQH002",), ("EAJF341",), ("EANF002",)),
        age=(40, 99),
        siblings=("I63.9",),
        stay_days=(5, 16),
        chronic=("I10", "I48.9", "E78.0"),
        act_rate=0.6,
    ),
    Diagnosis(
        "I61.9",
        "Hémorragie intracérébrale, sans précision",
        "neurologie",
        ("céphalée brutale et vomissements", _AVC_DEF, "trouble de conscience brutal"),
        (
            "scanner cérébral : hématome intraparenchymateux capsulo-lenticulaire",
            "hypertension artérielle sévère à l'admission",
            "score de Glasgow à 12, hémiplégie",
        ),
        (
            "hémorragie intracérébrale hypertensive, contrôle tensionnel strict",
            "hématome intracérébral profond, pas d'indication neurochirurgicale",
            "AVC hémorragique, rééducation en soins de suite",
        ),
        (("ACQK001",), ("EAQH002",)),
        age=(40, 99),
        siblings=("I63.9",),
        stay_days=(6, 18),
        chronic=("I10", "F10.2"),
        weight=0.6,
    ),
    Diagnosis(
        "G45.9",
        "Accident ischémique cérébral transitoire, sans précision",
        "neurologie",
        (
            "épisode transitoire de faiblesse du bras droit",
            "trouble de la parole régressif en 20 minutes",
            "cécité monoculaire transitoire",
        ),
        (
            "examen neurologique normal à l'arrivée",
            "IRM cérébrale sans lésion ischémique en diffusion",
            "écho-doppler des troncs supra-aortiques sans sténose significative",
        ),
        (
            "accident ischémique transitoire, antiagrégant plaquettaire",
            "AIT, bilan cardiologique et Holter ECG programmés",
            "accident ischémique transitoire sans récidive pendant le séjour",
        ),
        (("ACQN001",), ("EAQJ001",), ("DEQP003",)),
        age=(40, 99),
        siblings=("I63.9",),
        stay_days=(1, 4),
        chronic=("I10", "E78.0"),
    ),
    Diagnosis(
        "G40.9",
        "Épilepsie, sans précision",
        "neurologie",
        (
            _CONVULSION,
            "perte de connaissance avec mouvements tonico-cloniques",
            "morsure de langue et confusion post-critique",
        ),
        (
            "confusion post-critique résolutive, pas de déficit",
            "EEG : anomalies paroxystiques",
            "scanner cérébral sans lésion récente",
        ),
        (
            "crise d'épilepsie généralisée, introduction de lévétiracétam",
            "épilepsie connue, crise sur arrêt du traitement, observance rappelée",
            "épilepsie, majoration du traitement antiépileptique",
        ),
        (("ACQK001",), ("ACQN001",)),
        age=(16, 90),
        siblings=("G41.9",),
        stay_days=(1, 4),
        chronic=("F10.2",),
    ),
    Diagnosis(
        "G41.9",
        "État de mal épileptique, sans précision",
        "neurologie",
        (
            "crises convulsives subintrantes",
            "crise convulsive prolongée de plus de 30 minutes",
            _CONVULSION,
        ),
        (
            "absence de reprise de conscience entre les crises",
            "EEG : activité épileptique continue",
            "score de Glasgow à 7 au décours",
        ),
        (
            "état de mal épileptique traité par benzodiazépines puis phénytoïne",
            "état de mal épileptique, passage en réanimation",
            "état de mal épileptique résolutif, ajustement du traitement de fond",
        ),
        (("ACQK001",), ("DKMD001",)),
        age=(16, 90),
        siblings=("G40.9",),
        stay_days=(3, 10),
        weight=0.4,
    ),
    Diagnosis(
        "G35",
        "Sclérose en plaques",
        "neurologie",
        (
            "baisse d'acuité visuelle douloureuse",
            "poussée avec paresthésies des membres inférieurs",
            "troubles de l'équilibre d'apparition subaiguë",
        ),
        (
            "IRM : lésions de la substance blanche périventriculaires, dont une rehaussée",
            "syndrome pyramidal des membres inférieurs",
            "ponction lombaire : bandes oligoclonales",
        ),
        (
            "poussée de sclérose en plaques, bolus de méthylprednisolone",
            "sclérose en plaques rémittente, discussion d'un traitement de fond",
            "sclérose en plaques, poussée régressive sous corticoïdes",
        ),
        (("ACQJ002",), ("ACQN001",)),
        age=(18, 55),
        female_share=0.72,
        stay_days=(2, 5),
        weight=0.5,
    ),
    # ---------------------------------------------------------- gastro-entérologie
    Diagnosis(
        "K80.0",
        "Calcul de la vésicule biliaire avec cholécystite aiguë",
        "gastro-entérologie",
        (_HCD, "colique hépatique prolongée avec fièvre", "douleur abdominale après un repas gras"),
        (
            _MURPHY,
            "échographie : vésicule lithiasique à paroi épaissie",
            "hyperleucocytose, bilan hépatique normal",
        ),
        (
            "cholécystite aiguë lithiasique, cholécystectomie par cœlioscopie",
            "lithiase vésiculaire compliquée de cholécystite, antibiothérapie puis "
            "cholécystectomie",
            "cholécystite lithiasique opérée sans complication",
        ),
        (("ZCQM006",), ("HMFC004",)),
        age=(20, 95),
        female_share=0.65,
        siblings=("K81.0", "K85.1"),
        stay_days=(3, 8),
        chronic=("E66.9",),
        act_rate=0.8,
    ),
    Diagnosis(
        "K81.0",
        "Cholécystite aiguë",
        "gastro-entérologie",
        (
            _HCD,
            "fièvre et douleur abdominale chez un patient de réanimation",
            "douleur abdominale fébrile",
        ),
        (
            _MURPHY,
            "échographie : vésicule alithiasique distendue à paroi épaissie",
            "absence de calcul vésiculaire",
        ),
        (
            "cholécystite aiguë alithiasique, antibiothérapie",
            "cholécystite aiguë sans lithiase, drainage percutané",
            "cholécystite aiguë, cholécystectomie différée",
        ),
        (("ZCQM006",), ("HMFA007",)),
        age=(30, 95),
        siblings=("K80.0",),
        stay_days=(4, 10),
        weight=0.5,
    ),
    Diagnosis(
        "K85.1",
        "Pancréatite aiguë d'origine biliaire",
        "gastro-entérologie",
        (_PANC, "douleur épigastrique intense avec vomissements", _PANC_DOS),
        (
            _LIPASE,
            "échographie : lithiase vésiculaire, voie biliaire principale dilatée",
            "cytolyse hépatique transitoire",
        ),
        (
            "pancréatite aiguë biliaire, cholécystectomie programmée",
            "pancréatite aiguë lithiasique, extraction endoscopique d'un calcul cholédocien",
            "pancréatite biliaire œdémateuse d'évolution favorable",
        ),
        (("ZCQM006",), ("HMGE002",), ("ZCQK004",)),
        age=(25, 95),
        female_share=0.6,
        siblings=("K85.2", "K80.0"),
        stay_days=(4, 12),
    ),
    Diagnosis(
        "K85.2",
        "Pancréatite aiguë alcoolique",
        "gastro-entérologie",
        (_PANC, "douleur épigastrique après une alcoolisation aiguë", _PANC_DOS),
        (
            _LIPASE,
            "scanner : pancréatite œdémateuse, pas de lithiase",
            "consommation d'alcool quotidienne importante",
        ),
        (
            "pancréatite aiguë alcoolique, sevrage et prévention du délirium",
            "pancréatite alcoolique, orientation vers l'addictologie",
            "pancréatite aiguë d'origine éthylique d'évolution simple",
        ),
        (("ZCQK004",), ("ZCQM006",)),
        age=(25, 80),
        female_share=0.25,
        siblings=("K85.1",),
        stay_days=(4, 12),
        chronic=("F10.2", "F17.1"),
    ),
    Diagnosis(
        "K92.2",
        "Hémorragie gastro-intestinale, sans précision",
        "gastro-entérologie",
        ("méléna", "rectorragies abondantes", "malaise et selles noires"),
        (
            "anémie à 7 g/dl",
            "toucher rectal : méléna",
            "hémodynamique stable après remplissage",
        ),
        (
            "hémorragie digestive sans lésion retrouvée à la fibroscopie ni à la coloscopie",
            "hémorragie digestive, transfusion de deux culots globulaires",
            "saignement digestif d'origine indéterminée, vidéocapsule programmée",
        ),
        (("HEQE002",), ("HHQE005",)),
        age=(30, 99),
        siblings=("C18.7", "K57.3"),
        stay_days=(3, 8),
        chronic=("I48.9", "D64.9"),
        act_rate=0.85,
    ),
    Diagnosis(
        "K57.3",
        "Diverticulose du gros intestin, sans perforation ni abcès",
        "gastro-entérologie",
        (
            "douleur de la fosse iliaque gauche fébrile",
            "fièvre et douleur abdominale basse gauche",
            "troubles du transit et douleur abdominale",
        ),
        (
            "défense de la fosse iliaque gauche",
            "scanner : sigmoïdite diverticulaire non compliquée",
            "CRP élevée",
        ),
        (
            "sigmoïdite diverticulaire non compliquée, antibiothérapie orale",
            "poussée de diverticulite sigmoïdienne, coloscopie à distance",
            "diverticulite non compliquée d'évolution favorable",
        ),
        (("ZCQK004",),),
        age=(35, 95),
        siblings=("K37", "C18.7"),
        stay_days=(3, 7),
        chronic=("E66.9",),
    ),
    Diagnosis(
        "K37",
        "Appendicite, sans précision",
        "gastro-entérologie",
        (
            "douleur de la fosse iliaque droite",
            "douleur abdominale fébrile migrant en fosse iliaque droite",
            "vomissements et douleur abdominale",
        ),
        (
            "défense de la fosse iliaque droite",
            "échographie : appendice augmenté de volume",
            "hyperleucocytose",
        ),
        (
            "appendicite aiguë, appendicectomie par cœlioscopie",
            "appendicite opérée, suites simples",
            "appendicectomie, examen anatomopathologique : appendicite aiguë",
        ),
        (("ZCQM008",), ("ZCQK004",)),
        age=(8, 70),
        siblings=("K57.3", "O00.1"),
        stay_days=(1, 4),
    ),
    # -------------------------------------------------------------- endocrinologie
    Diagnosis(
        "E10.1",
        "Diabète sucré de type 1, avec acidocétose",
        "endocrinologie",
        (
            "polyuro-polydipsie et vomissements",
            "altération de l'état général chez un diabétique de type 1",
            "douleurs abdominales et dyspnée de Kussmaul",
        ),
        (
            "glycémie à 4,5 g/l, cétonurie à trois croix",
            "acidose métabolique avec pH à 7,12",
            "déshydratation extracellulaire",
        ),
        (
            "acidocétose diabétique inaugurale, insulinothérapie intraveineuse puis schéma "
            "basal-bolus",
            "acidocétose sur arrêt de l'insuline, éducation thérapeutique",
            "décompensation acidocétosique d'un diabète de type 1",
        ),
        (),
        age=(12, 55),
        siblings=("E16.2", "E86"),
        stay_days=(2, 6),
    ),
    Diagnosis(
        "E16.2",
        "Hypoglycémie, sans précision",
        "endocrinologie",
        (
            "malaise avec sueurs et confusion",
            "trouble de conscience chez un patient diabétique",
            "hypoglycémie sévère",
        ),
        (
            "glycémie capillaire à 0,35 g/l",
            "correction rapide après resucrage",
            "pas de déficit neurologique après correction",
        ),
        (
            "hypoglycémie sévère sous sulfamide, arrêt du traitement",
            "hypoglycémie iatrogène, adaptation des doses d'insuline",
            "hypoglycémie sans cause retrouvée, surveillance glycémique",
        ),
        (("DEQP003",),),
        age=(20, 99),
        siblings=("E10.1", "R53"),
        stay_days=(1, 3),
        chronic=("E11.9", "N18.3"),
    ),
    Diagnosis(
        "E87.1",
        "Hypo-osmolarité et hyponatrémie",
        "endocrinologie",
        (
            "confusion et troubles de la marche",
            "nausées et chute",
            "hyponatrémie découverte au bilan",
        ),
        (
            "natrémie à 118 mmol/l",
            "pas de signe de déshydratation",
            "osmolalité plasmatique basse",
        ),
        (
            "hyponatrémie sévère sur sécrétion inappropriée d'hormone antidiurétique, "
            "restriction hydrique",
            "hyponatrémie médicamenteuse sous thiazidique, arrêt du diurétique",
            "hyponatrémie corrigée progressivement",
        ),
        (("ACQK001",),),
        age=(50, 99),
        female_share=0.6,
        siblings=("E86", "F05.1"),
        stay_days=(3, 9),
        chronic=("I10",),
    ),
    Diagnosis(
        "E05.0",
        "Thyréotoxicose avec goitre diffus",
        "endocrinologie",
        (
            "amaigrissement et palpitations",
            "tremblements et thermophobie",
            "tachycardie et diarrhée",
        ),
        (
            "goitre diffus vasculaire, exophtalmie",
            "TSH effondrée, T4 libre élevée",
            "anticorps anti-récepteurs de la TSH positifs",
        ),
        (
            "maladie de Basedow, antithyroïdiens de synthèse",
            "hyperthyroïdie de Basedow, thyroïdectomie totale",
            "thyrotoxicose avec goitre diffus, bêtabloquant et carbimazole",
        ),
        (("KCFA005",),),
        age=(18, 70),
        female_share=0.8,
        siblings=("I48.0",),
        stay_days=(2, 5),
        act_rate=0.3,
        weight=0.5,
    ),
    # -------------------------------------------------------- néphrologie-urologie
    Diagnosis(
        "N39.0",
        "Infection des voies urinaires, siège non précisé",
        "néphrologie-urologie",
        (_BRULURES, "fièvre et confusion chez une patiente âgée", "pollakiurie et urines troubles"),
        (_ECBU, "bandelette urinaire positive", "pas de douleur lombaire"),
        (
            "infection urinaire à Escherichia coli, antibiothérapie adaptée",
            "infection des voies urinaires, relais oral",
            "infection urinaire fébrile d'évolution favorable",
        ),
        (("ZCQM008",),),
        age=(18, 110),
        female_share=0.7,
        siblings=("N10", "N41.0"),
        stay_days=(2, 7),
        weight=1.3,
    ),
    Diagnosis(
        "N10",
        "Néphrite tubulo-interstitielle aiguë",
        "néphrologie-urologie",
        ("fièvre et douleur lombaire droite", _BRULURES, "frissons et douleur lombaire"),
        (
            "douleur à l'ébranlement lombaire droit",
            _ECBU,
            "échographie rénale : pas de dilatation des cavités",
        ),
        (
            "pyélonéphrite aiguë non compliquée, ceftriaxone puis relais oral",
            "pyélonéphrite aiguë droite, apyrexie à 48 heures",
            "pyélonéphrite aiguë à Escherichia coli",
        ),
        (("ZCQM008",), ("ZCQK004",)),
        age=(16, 95),
        female_share=0.8,
        siblings=("N39.0",),
        stay_days=(2, 6),
    ),
    Diagnosis(
        "N17.9",
        "Insuffisance rénale aiguë, sans précision",
        "néphrologie-urologie",
        (
            "oligurie et altération de l'état général",
            "insuffisance rénale découverte au bilan",
            "déshydratation avec élévation de la créatinine",
        ),
        (
            "créatinine à 450 µmol/l",
            "hyperkaliémie à 6,2 mmol/l",
            "échographie : reins de taille normale sans obstacle",
        ),
        (
            "insuffisance rénale aiguë fonctionnelle, réhydratation",
            "insuffisance rénale aiguë sur anti-inflammatoires non stéroïdiens, récupération "
            "partielle",
            "insuffisance rénale aiguë résolutive après arrêt des néphrotoxiques",
        ),
        (("ZCQM008",),),
        age=(40, 99),
        siblings=("E86",),
        stay_days=(3, 10),
        chronic=("N18.3", "I10", "E11.9"),
    ),
    Diagnosis(
        "N20.1",
        "Calcul de l'uretère",
        "néphrologie-urologie",
        (
            "douleur lombaire brutale irradiant vers les organes génitaux",
            "colique néphrétique",
            "colique néphrétique hyperalgique",
        ),
        (
            "hématurie microscopique",
            "scanner : calcul urétéral de 6 mm avec dilatation",
            "pas de fièvre",
        ),
        (
            "colique néphrétique sur calcul urétéral, pose de sonde double J",
            "calcul de l'uretère expulsé spontanément",
            "lithiase urétérale, urétéroscopie programmée",
        ),
        (("ZCQK004",), ("ZCQK002",)),
        age=(20, 80),
        female_share=0.35,
        siblings=("N10",),
        stay_days=(1, 4),
    ),
    Diagnosis(
        "N40",
        "Hyperplasie de la prostate",
        "néphrologie-urologie",
        ("rétention aiguë d'urine", "dysurie et pollakiurie nocturne", "globe vésical"),
        (
            "prostate augmentée de volume, souple, non nodulaire",
            "globe vésical à 900 ml",
            "PSA normal",
        ),
        (
            "hypertrophie bénigne de la prostate, résection endoscopique",
            "rétention aiguë sur adénome prostatique, sondage puis alpha-bloquant",
            "adénome de la prostate, sevrage de sonde réussi",
        ),
        (("ZCQM008",),),
        age=(50, 95),
        sex="M",
        siblings=("C61", "N41.0"),
        stay_days=(2, 5),
        chronic=("I10",),
    ),
    Diagnosis(
        "N41.0",
        "Prostatite aiguë",
        "néphrologie-urologie",
        (
            "fièvre et brûlures mictionnelles chez un homme",
            "dysurie fébrile",
            "fièvre et douleurs périnéales",
        ),
        ("toucher rectal : prostate douloureuse", _ECBU, "PSA élevé dans un contexte infectieux"),
        (
            "prostatite aiguë, fluoroquinolone pour trois semaines",
            "infection urinaire masculine, antibiothérapie prolongée",
            "prostatite aiguë à Escherichia coli",
        ),
        (("ZCQM008",),),
        age=(20, 90),
        sex="M",
        siblings=("N39.0", "N40"),
        stay_days=(2, 6),
    ),
    # -------------------------------------------------- orthopédie-traumatologie
    Diagnosis(
        "S72.0",
        "Fracture du col du fémur",
        "orthopédie-traumatologie",
        (_CHUTE, _CHUTE_DOM, "douleur de hanche après une chute"),
        (
            _ROT_EXT,
            "radiographie : fracture du col fémoral déplacée",
            "impossibilité de lever la jambe",
        ),
        (
            "fracture du col du fémur, prothèse intermédiaire de hanche",
            "fracture cervicale vraie traitée par arthroplastie",
            "fracture du col fémoral opérée, mise en charge immédiate",
        ),
        (("DEQP003",), ("ZBQK002",)),
        age=(60, 110),
        female_share=0.75,
        siblings=("S72.1", "R29.6"),
        stay_days=(5, 14),
        chronic=("I10", "F03", "D64.9"),
        weight=1.2,
    ),
    Diagnosis(
        "S72.1",
        "Fracture pertrochantérienne",
        "orthopédie-traumatologie",
        (_CHUTE, _CHUTE_DOM, "douleur de hanche et hématome après une chute"),
        (
            _ROT_EXT,
            "radiographie : fracture pertrochantérienne",
            "hématome de la face externe de cuisse",
        ),
        (
            "fracture pertrochantérienne, ostéosynthèse par clou centromédullaire",
            "fracture trochantérienne enclouée, transfusion d'un culot",
            "fracture du massif trochantérien ostéosynthésée",
        ),
        (("DEQP003",), ("ZBQK002",)),
        age=(60, 110),
        female_share=0.75,
        siblings=("S72.0",),
        stay_days=(5, 14),
        chronic=("I10", "F03", "D64.9"),
        weight=1.1,
    ),
    Diagnosis(
        "S52.5",
        "Fracture de l'extrémité inférieure du radius",
        "orthopédie-traumatologie",
        (
            "chute sur la main en extension",
            "douleur et déformation du poignet",
            "traumatisme du poignet",
        ),
        (
            "déformation du poignet en dos de fourchette",
            "radiographie : fracture de l'extrémité distale du radius",
            "pas de trouble sensitif des doigts",
        ),
        (
            "fracture du poignet, réduction et ostéosynthèse par broches",
            "fracture de Pouteau-Colles, immobilisation plâtrée",
            "fracture de l'extrémité inférieure du radius opérée",
        ),
        (("DEQP003",),),
        age=(10, 95),
        female_share=0.65,
        stay_days=(1, 3),
        act_rate=0.3,
    ),
    Diagnosis(
        "S06.0",
        "Commotion cérébrale",
        "orthopédie-traumatologie",
        (
            "traumatisme crânien avec perte de connaissance",
            "chute avec choc crânien",
            "traumatisme crânien lors d'un accident de la voie publique",
        ),
        (
            "score de Glasgow à 15, amnésie des faits",
            "scanner cérébral normal",
            "céphalées et nausées",
        ),
        (
            "commotion cérébrale, surveillance neurologique de 24 heures",
            "traumatisme crânien léger sans lésion",
            "commotion cérébrale, consignes de surveillance remises",
        ),
        (("ACQK001",),),
        age=(10, 99),
        female_share=0.4,
        siblings=("R29.6",),
        stay_days=(1, 2),
        act_rate=0.9,
    ),
    Diagnosis(
        "M17.1",
        "Autres gonarthroses primaires",
        "orthopédie-traumatologie",
        (
            "gonalgie mécanique invalidante",
            "intervention programmée pour arthrose du genou",
            "gonarthrose évoluée",
        ),
        (
            "genou varus, flexion limitée",
            "radiographie : pincement fémoro-tibial interne complet",
            _MARCHE,
        ),
        (
            "gonarthrose, prothèse totale du genou",
            "arthroplastie totale du genou sans complication",
            "gonarthrose primitive, rééducation en centre",
        ),
        (("DEQP003",),),
        age=(50, 90),
        female_share=0.65,
        siblings=("M16.1",),
        stay_days=(3, 7),
        chronic=("E66.9", "I10"),
        act_rate=0.5,
    ),
    Diagnosis(
        "M16.1",
        "Autres coxarthroses primaires",
        "orthopédie-traumatologie",
        (
            "coxalgie mécanique invalidante",
            "intervention programmée pour arthrose de hanche",
            "coxarthrose évoluée",
        ),
        (
            "flexion de hanche limitée, boiterie",
            "radiographie : pincement coxo-fémoral supéro-externe",
            _MARCHE,
        ),
        (
            "coxarthrose, prothèse totale de hanche",
            "arthroplastie totale de hanche sans complication",
            "coxarthrose primitive, rééducation en centre",
        ),
        (("DEQP003",),),
        age=(50, 90),
        female_share=0.55,
        siblings=("M17.1",),
        stay_days=(3, 7),
        chronic=("E66.9", "I10"),
        act_rate=0.5,
    ),
    # ----------------------------------------------------------------- obstétrique
    Diagnosis(
        "O80.0",
        "Accouchement spontané par présentation du sommet",
        "obstétrique",
        (
            "entrée en travail spontané à terme",
            "contractions utérines régulières à 39 semaines d'aménorrhée",
            "rupture de la poche des eaux à terme",
        ),
        (
            "col dilaté à 4 cm, présentation céphalique",
            "rythme cardiaque fœtal normal",
            "liquide amniotique clair",
        ),
        (
            "accouchement par voie basse spontané d'un enfant vivant",
            "accouchement eutocique, suites de couches simples",
            "accouchement spontané, allaitement maternel",
        ),
        (("JQGD010", "JQGD012"),),
        age=(16, 45),
        sex="F",
        siblings=("O72.1", "O24.4"),
        stay_days=(2, 4),
        act_rate=1.0,
        weight=1.6,
    ),
    Diagnosis(
        "O34.2",
        "Soins maternels pour cicatrice utérine due à une intervention chirurgicale antérieure",
        "obstétrique",
        (
            "césarienne programmée sur utérus cicatriciel",
            "grossesse à terme avec antécédent de deux césariennes",
            "utérus bicicatriciel à 39 semaines d'aménorrhée",
        ),
        (
            "présentation céphalique, rythme cardiaque fœtal normal",
            "cicatrice de césarienne antérieure",
            "col fermé",
        ),
        (
            "césarienne itérative programmée, naissance d'un enfant vivant",
            "césarienne pour utérus cicatriciel, suites simples",
            "césarienne itérative sans complication",
        ),
        (("JQGA002",),),
        age=(20, 45),
        sex="F",
        siblings=("O80.0",),
        stay_days=(3, 5),
        act_rate=1.0,
        weight=0.7,
    ),
    Diagnosis(
        "O14.1",
        "Prééclampsie sévère",
        "obstétrique",
        (
            "céphalées et hypertension au troisième trimestre",
            "œdèmes et hypertension artérielle sévère",
            "barre épigastrique chez une femme enceinte",
        ),
        (
            "pression artérielle à 170/110 mmHg",
            "protéinurie à 3 g/24 h",
            "réflexes vifs, phosphènes",
        ),
        (
            "prééclampsie sévère, sulfate de magnésium et extraction fœtale",
            "prééclampsie sévère, césarienne en urgence",
            "prééclampsie sévère, surveillance en grossesse pathologique",
        ),
        (("JQGA004", "JQGA003"),),
        age=(16, 45),
        sex="F",
        siblings=("O24.4",),
        stay_days=(3, 10),
        chronic=("E66.9",),
        act_rate=0.6,
        weight=0.5,
    ),
    Diagnosis(
        "O24.4",
        "Diabète sucré survenant au cours de la grossesse",
        "obstétrique",
        (
            "déséquilibre d'un diabète gestationnel",
            "hyperglycémies malgré le régime",
            "diabète gestationnel insulinorequérant",
        ),
        (
            "glycémies postprandiales supérieures à 1,40 g/l",
            "hyperglycémie provoquée orale pathologique à 26 semaines",
            "biométries fœtales au 90e percentile",
        ),
        (
            "diabète gestationnel, mise sous insuline",
            "diabète gestationnel équilibré sous insuline",
            "diabète gestationnel, éducation diététique",
        ),
        (("JQGD010", "JQGD012"),),
        age=(18, 45),
        sex="F",
        siblings=("O80.0", "O14.1"),
        stay_days=(2, 5),
        chronic=("E66.9",),
        act_rate=0.3,
        weight=0.6,
    ),
    Diagnosis(
        "O72.1",
        "Autres hémorragies immédiates du post-partum",
        "obstétrique",
        (
            "hémorragie après l'accouchement",
            "saignement abondant dans les suites immédiates de couches",
            "hémorragie du post-partum immédiat",
        ),
        (
            "utérus mou mal rétracté",
            "perte sanguine estimée à 1 200 ml",
            "anémie à 7 g/dl après l'accouchement",
        ),
        (
            "hémorragie du post-partum par atonie utérine, ocytociques et sulprostone",
            "hémorragie du post-partum immédiat, transfusion",
            "hémorragie du post-partum résolutive sous utérotoniques",
        ),
        (("JQGD010", "JQGD012"),),
        age=(16, 45),
        sex="F",
        siblings=("O80.0",),
        stay_days=(3, 6),
        act_rate=0.9,
        weight=0.4,
    ),
    Diagnosis(
        "O00.1",
        "Grossesse tubaire",
        "obstétrique",
        (
            "douleur pelvienne et métrorragies",
            "aménorrhée et douleur de la fosse iliaque",
            "malaise avec douleur pelvienne",
        ),
        (
            "bêta-HCG positifs, utérus vide à l'échographie",
            "masse latéro-utérine droite à l'échographie endovaginale",
            "épanchement du cul-de-sac de Douglas",
        ),
        (
            "grossesse extra-utérine tubaire, salpingectomie par cœlioscopie",
            "grossesse extra-utérine tubaire traitée par méthotrexate",
            "grossesse tubaire rompue, prise en charge chirurgicale",
        ),
        (("ZCQJ006", "ZCQM003"),),
        age=(18, 45),
        sex="F",
        siblings=("K37",),
        stay_days=(1, 4),
        act_rate=0.9,
        weight=0.4,
    ),
    # ------------------------------------------------------------------ oncologie
    Diagnosis(
        "C34.1",
        "Tumeur maligne du lobe supérieur, bronches ou poumon",
        "oncologie",
        (
            "toux persistante et hémoptysie chez un fumeur",
            "altération de l'état général et amaigrissement",
            "découverte d'une opacité pulmonaire",
        ),
        (
            "scanner : masse spiculée du lobe supérieur droit",
            "biopsie : adénocarcinome bronchique",
            "TEP-scanner : fixation hilaire homolatérale",
        ),
        (
            "adénocarcinome du lobe supérieur droit, dossier présenté en réunion de "
            "concertation pluridisciplinaire",
            "cancer bronchique lobaire supérieur, chimiothérapie proposée",
            "carcinome épidermoïde du lobe supérieur, lobectomie discutée",
        ),
        (("ZZHH008",), ("ZBQK002",)),
        age=(40, 90),
        female_share=0.35,
        siblings=("Z51.1", "J18.9"),
        stay_days=(3, 10),
        chronic=("F17.1", "J44.9"),
        weight=1.1,
    ),
    Diagnosis(
        "C50.9",
        "Tumeur maligne du sein, sans précision",
        "oncologie",
        (
            "nodule du sein découvert à l'autopalpation",
            "bilan d'un cancer du sein",
            "mammographie de dépistage anormale",
        ),
        (
            "nodule mammaire dur de 2 cm",
            "biopsie : carcinome infiltrant, récepteurs hormonaux positifs",
            "adénopathie axillaire",
        ),
        (
            "cancer du sein, chirurgie conservatrice et ganglion sentinelle",
            "carcinome mammaire, traitement adjuvant discuté en réunion de concertation "
            "pluridisciplinaire",
            "cancer du sein localisé, radiothérapie adjuvante",
        ),
        (("ZZHJ013",), ("ZZNL048",)),
        age=(30, 90),
        sex="F",
        siblings=("Z51.1",),
        stay_days=(2, 5),
        weight=1.0,
    ),
    Diagnosis(
        "C18.7",
        "Tumeur maligne du côlon sigmoïde",
        "oncologie",
        (
            "rectorragies et troubles du transit",
            "anémie ferriprive et amaigrissement",
            "syndrome subocclusif",
        ),
        (
            "coloscopie : tumeur sténosante du sigmoïde",
            "biopsie : adénocarcinome lieberkühnien",
            "antigène carcinoembryonnaire élevé",
        ),
        (
            "adénocarcinome du côlon sigmoïde, colectomie gauche",
            "cancer du sigmoïde opéré, chimiothérapie adjuvante",
            "tumeur sigmoïdienne, résection par cœlioscopie",
        ),
        (("HHQE005",), ("ZCQK004",)),
        age=(40, 95),
        siblings=("K92.2", "K57.3", "Z51.1"),
        stay_days=(4, 12),
        chronic=("E66.9",),
    ),
    Diagnosis(
        "C61",
        "Tumeur maligne de la prostate",
        "oncologie",
        (
            "élévation du PSA",
            "troubles mictionnels et PSA élevé",
            "douleurs osseuses chez un homme âgé",
        ),
        (
            "toucher rectal : prostate indurée",
            "biopsies prostatiques : adénocarcinome score de Gleason 7",
            "IRM : lésion prostatique suspecte",
        ),
        (
            "adénocarcinome prostatique, prostatectomie totale",
            "cancer de la prostate, radiothérapie et hormonothérapie",
            "adénocarcinome de la prostate, surveillance active",
        ),
        (("ZCQN001",), ("ZZNL048",)),
        age=(50, 95),
        sex="M",
        siblings=("N40",),
        stay_days=(2, 6),
    ),
    Diagnosis(
        "C79.3",
        "Tumeur maligne secondaire du cerveau et des méninges cérébrales",
        "oncologie",
        (
            "céphalées et crise convulsive chez une patiente suivie pour cancer",
            "déficit moteur progressif et antécédent de cancer",
            "troubles du comportement d'apparition récente",
        ),
        (
            "IRM : lésions cérébrales multiples rehaussées",
            "œdème périlésionnel important",
            "scanner thoraco-abdominal : tumeur primitive connue",
        ),
        (
            "métastases cérébrales, corticothérapie et radiothérapie",
            "localisations secondaires cérébrales, radiothérapie stéréotaxique",
            "métastases cérébrales multiples, soins de support",
        ),
        (("ACQJ002", "ACQH003"), ("ZZNL048",)),
        age=(35, 90),
        siblings=("G40.9", "I63.9"),
        stay_days=(4, 12),
        chronic=("F17.1",),
        weight=0.6,
    ),
    Diagnosis(
        "Z51.1",
        "Séance de chimiothérapie pour tumeur",
        "oncologie",
        (
            "cure de chimiothérapie programmée",
            "hospitalisation pour chimiothérapie d'un cancer bronchique",
            "cycle de chimiothérapie adjuvante d'un cancer du côlon",
        ),
        (
            "bonne tolérance de la cure précédente",
            "bilan biologique compatible avec la cure",
            "état général conservé",
        ),
        (
            "chimiothérapie réalisée sans incident",
            "cure administrée, prochaine cure dans trois semaines",
            "chimiothérapie bien tolérée",
        ),
        (),
        age=(30, 90),
        siblings=("C34.1", "C18.7", "C50.9"),
        stay_days=(1, 2),
        weight=1.2,
    ),
    # -------------------------------------------------------------- infectiologie
    Diagnosis(
        "A41.9",
        "Sepsis, sans précision",
        "infectiologie",
        (
            "fièvre et frissons avec hypotension",
            "altération de l'état général fébrile",
            "fièvre et confusion",
        ),
        (
            "pression artérielle à 80/45 mmHg, marbrures",
            "lactates élevés",
            "hémocultures prélevées",
        ),
        (
            "sepsis sans porte d'entrée retrouvée, antibiothérapie probabiliste",
            "choc septique, remplissage et noradrénaline",
            "sepsis d'évolution favorable sous antibiothérapie",
        ),
        (("ZBQK002",), ("ZCQK004",)),
        age=(18, 110),
        siblings=("N39.0", "J18.9"),
        stay_days=(5, 14),
        chronic=("E11.9", "N18.3"),
    ),
    Diagnosis(
        "A46",
        "Érysipèle",
        "infectiologie",
        (
            "grosse jambe rouge fébrile",
            "placard inflammatoire de jambe",
            "fièvre et rougeur de la jambe",
        ),
        (
            "placard érythémateux chaud à bords nets",
            "intertrigo inter-orteils",
            "adénopathie inguinale",
        ),
        (
            "érysipèle de jambe, amoxicilline",
            "dermohypodermite bactérienne non nécrosante",
            "érysipèle d'évolution favorable",
        ),
        (),
        age=(30, 99),
        siblings=("A41.9",),
        stay_days=(3, 8),
        chronic=("E66.9", "E11.9"),
    ),
    Diagnosis(
        "A09.9",
        "Gastroentérite et colite d'origine non précisée",
        "infectiologie",
        ("diarrhée et vomissements", "gastroentérite aiguë", "diarrhée aiguë fébrile"),
        ("déshydratation modérée", "abdomen souple, sensible", "coproculture négative"),
        (
            "gastroentérite aiguë, réhydratation",
            "gastroentérite d'évolution favorable",
            "diarrhée aiguë résolutive",
        ),
        (),
        age=(16, 99),
        siblings=("E86",),
        stay_days=(1, 4),
    ),
    Diagnosis(
        "J11.1",
        "Grippe avec d'autres manifestations respiratoires, virus non identifié",
        "infectiologie",
        ("syndrome grippal avec fièvre élevée", "fièvre, myalgies et toux", _PNP_MOTIF),
        (
            "courbatures diffuses, fièvre à 39,5 °C",
            "radiographie pulmonaire normale",
            "contexte épidémique",
        ),
        (
            "grippe saisonnière, traitement symptomatique",
            "syndrome grippal sans complication",
            "grippe, isolement et antipyrétiques",
        ),
        _PNEUMO,
        age=(18, 99),
        siblings=("J18.9",),
        stay_days=(2, 6),
        chronic=("J44.9",),
    ),
    Diagnosis(
        "G03.9",
        "Méningite, sans précision",
        "infectiologie",
        (
            "céphalées fébriles et raideur de nuque",
            "fièvre, céphalées et photophobie",
            "syndrome méningé fébrile",
        ),
        (
            "raideur méningée, signe de Kernig",
            "ponction lombaire : liquide clair, hyperprotéinorachie",
            "pas de purpura",
        ),
        (
            "méningite sans germe identifié, évolution favorable",
            "méningite, antibiothérapie probabiliste puis arrêt",
            "syndrome méningé, méningite non documentée",
        ),
        (("ACQK001",),),
        age=(16, 80),
        siblings=("A41.9",),
        stay_days=(3, 10),
        weight=0.4,
    ),
    # ------------------------------------------------------------------ gériatrie
    Diagnosis(
        "R29.6",
        "Chutes à répétition, non classées ailleurs",
        "gériatrie",
        (
            "chutes à répétition",
            "chute à domicile, troisième en un mois",
            "difficultés à la marche et chutes",
        ),
        (
            "appui unipodal impossible, test du lever de chaise pathologique",
            "pas de fracture à la radiographie",
            "hypotension orthostatique recherchée, absente",
        ),
        (
            "chutes à répétition multifactorielles, kinésithérapie",
            "syndrome de chute, aménagement du domicile",
            "chutes répétées, réévaluation des psychotropes",
        ),
        (("ACQK001",), ("DEQP003",)),
        age=(70, 110),
        female_share=0.7,
        siblings=("S72.0", "R53"),
        stay_days=(4, 12),
        chronic=("I10", "F03", "I48.9"),
        weight=1.2,
    ),
    Diagnosis(
        "F05.1",
        "Delirium surajouté à une démence",
        "gériatrie",
        (
            "confusion aiguë chez une patiente démente",
            "agitation nocturne et désorientation",
            "troubles du comportement aigus",
        ),
        (
            "désorientation temporo-spatiale, inattention",
            "évaluation cognitive non réalisable",
            "pas de globe vésical, pas de fécalome",
        ),
        (
            "syndrome confusionnel sur démence, cause infectieuse traitée",
            "confusion aiguë surajoutée à une démence d'Alzheimer",
            "delirium résolutif, retour en établissement",
        ),
        (("ACQK001",),),
        age=(70, 110),
        female_share=0.7,
        siblings=("E87.1", "N39.0"),
        stay_days=(5, 15),
        chronic=("F03", "I10"),
    ),
    Diagnosis(
        "E43",
        "Malnutrition protéino-énergétique grave, sans précision",
        "gériatrie",
        (
            "altération de l'état général et amaigrissement",
            "perte de poids de 15 % en six mois",
            "anorexie et asthénie",
        ),
        ("IMC à 16 kg/m²", "albuminémie à 22 g/l", "fonte musculaire"),
        (
            "dénutrition protéino-énergétique sévère, nutrition entérale",
            "dénutrition sévère, compléments nutritionnels oraux",
            "dénutrition sévère, suivi diététique",
        ),
        (),
        age=(65, 110),
        female_share=0.65,
        siblings=("R53", "C34.1"),
        stay_days=(6, 16),
        chronic=("F03",),
    ),
    Diagnosis(
        "E86",
        "Hypovolémie",
        "gériatrie",
        (
            "altération de l'état général et déshydratation",
            "fièvre et déshydratation chez une patiente âgée",
            "sécheresse des muqueuses et confusion",
        ),
        (
            "pli cutané persistant, muqueuses sèches",
            "insuffisance rénale fonctionnelle",
            "hypernatrémie à 150 mmol/l",
        ),
        (
            "déshydratation extracellulaire, réhydratation intraveineuse",
            "déshydratation, réhydratation et surveillance des apports",
            "hypovolémie sur défaut d'apports",
        ),
        (),
        age=(65, 110),
        female_share=0.65,
        siblings=("N17.9", "A09.9"),
        stay_days=(3, 9),
        chronic=("F03", "I10"),
    ),
    Diagnosis(
        "R53",
        "Malaise et fatigue",
        "gériatrie",
        (
            "asthénie et altération de l'état général",
            "fatigue inhabituelle",
            "malaise sans perte de connaissance",
        ),
        (
            "examen clinique sans particularité",
            "bilan biologique sans anomalie notable",
            "ECG normal",
        ),
        (
            "asthénie sans cause organique retrouvée",
            "malaise et fatigue, bilan négatif",
            "asthénie d'origine indéterminée",
        ),
        (("DEQP003",),),
        age=(60, 110),
        female_share=0.65,
        siblings=("E43", "R29.6"),
        stay_days=(2, 6),
        chronic=("I10",),
    ),
)

DIAGNOSIS_BY_CODE: MappingProxyType[str, Diagnosis] = MappingProxyType(
    {d.code: d for d in DIAGNOSES}
)
ASSOCIATED_BY_CODE: MappingProxyType[str, Associated] = MappingProxyType(
    {a.code: a for a in ASSOCIATED}
)
ACT_BY_CODE: MappingProxyType[str, Act] = MappingProxyType({a.code: a for a in ACTS})


def _check_tables() -> None:
    """Fail at import when a table refers to a code it does not define."""
    codes = set(DIAGNOSIS_BY_CODE)
    if len(codes) != len(DIAGNOSES) or len(ACT_BY_CODE) != len(ACTS):
        raise RuntimeError("duplicate code in the corpus tables")
    for d in DIAGNOSES:
        if d.specialty not in SPECIALTIES:
            raise RuntimeError(f"{d.code}: unknown specialty {d.specialty}")
        for sib in d.siblings:
            if sib not in codes:
                raise RuntimeError(f"{d.code}: unknown sibling {sib}")
        for alternatives in d.acts:
            for act in alternatives:
                if act not in ACT_BY_CODE:
                    raise RuntimeError(f"{d.code}: unknown act {act}")
        for chronic in d.chronic:
            if chronic not in ASSOCIATED_BY_CODE:
                raise RuntimeError(f"{d.code}: unknown associated code {chronic}")


_check_tables()
