"""French and English for what compliance officers read: one string table, and the way
figures and times are shown.

``text(lang, key, **values)`` looks a phrase up in :data:`STRINGS` (every key has both
languages; a test checks it). Privacy figures are never rounded in the user's favour:
:func:`up` rounds a figure whose larger value is the worse news (epsilon, delta, AUC,
TPR, budget spent) towards +infinity, :func:`down` rounds one whose smaller value is the
worse news (budget remaining, the largest epsilon an audit could detect) towards
-infinity, both exactly (in :class:`decimal.Decimal`, from the float's shortest decimal form).
Times are shown in UTC with the local time of the sites (Europe/Paris) beside them.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from datetime import UTC, datetime
from decimal import ROUND_CEILING, ROUND_FLOOR, Decimal, InvalidOperation
from typing import Any, Literal, get_args
from zoneinfo import ZoneInfo

Lang = Literal["en", "fr"]
LANGS: tuple[Lang, ...] = get_args(Lang)
LOCAL_ZONE = ZoneInfo("Europe/Paris")

STRINGS: dict[str, dict[Lang, str]] = {
    # -- page frame
    "site_title": {"en": "Passerelle — ledger report of {site}",
                   "fr": "Passerelle — rapport du registre de {site}"},
    "generated": {"en": "Generated {time} from the site's signed ledger, trust store and "
                        "MLflow store.",
                  "fr": "Produit le {time} à partir du registre signé du site, de son "
                        "magasin de confiance et de son registre MLflow."},
    "summary": {"en": "Summary: what a data protection officer asks",
                "fr": "Synthèse : les questions du délégué à la protection des données"},
    "question": {"en": "question", "fr": "question"},
    "answer": {"en": "answer", "fr": "réponse"},
    "integrity_ok": {"en": "Ledger integrity: VERIFIED", "fr": "Intégrité du registre : "
                                                               "VÉRIFIÉE"},
    "integrity_broken": {"en": "Ledger integrity: BROKEN", "fr": "Intégrité du registre : "
                                                                 "ROMPUE"},
    "integrity_detail": {
        "en": "Checked: the signature of every record (this site's current and retired "
              "keys), the hash chain from the first record, and that the model and ONNX "
              "digests named still match the site's MLflow store where the versions still "
              "exist. Dropped newest records are detectable only against a checkpoint or a "
              "peer's export kept elsewhere (<code>passerelle records verify "
              "--checkpoint/--peer</code>).",
        "fr": "Vérifié : la signature de chaque enregistrement (clés actuelle et retirées du "
              "site), la chaîne de hachage depuis le premier enregistrement, et que les "
              "empreintes des modèles et fichiers ONNX citées correspondent encore au "
              "registre MLflow du site, là où les versions existent. La suppression des "
              "derniers enregistrements ne se voit qu'avec un point de contrôle ou l'export "
              "d'un pair conservés ailleurs (<code>passerelle records verify "
              "--checkpoint/--peer</code>)."},
    "integrity_count": {"en": "{n} records: every signature, the chain and the digests "
                              "still held in MLflow verify",
                        "fr": "{n} enregistrements : chaque signature, la chaîne et les "
                              "empreintes encore présentes dans MLflow sont vérifiées"},
    # -- summary questions
    "q_integrity": {"en": "Is the ledger intact?", "fr": "Le registre est-il intègre ?"},
    "q_sent": {"en": "Which models left this site, with which verdict?",
               "fr": "Quels modèles ont quitté le site, avec quel verdict ?"},
    "q_received": {"en": "Which models did this site receive?",
                   "fr": "Quels modèles le site a-t-il reçus ?"},
    "q_refused": {"en": "Which bundles were refused?", "fr": "Quels paquets ont été refusés ?"},
    "q_budget": {"en": "How much privacy budget is spent, per dataset?",
                 "fr": "Quel budget de confidentialité est consommé, par jeu de données ?"},
    "q_finetune_problems": {"en": "Did a fine-tuning run fail or stop midway?",
                            "fr": "Un ajustement a-t-il échoué ou été interrompu ?"},
    "q_withdrawn": {"en": "Were models withdrawn, or withdrawal notices received?",
                    "fr": "Des modèles ont-ils été retirés, des avis de retrait reçus ?"},
    "q_expiring": {"en": "What is expiring?", "fr": "Qu'est-ce qui arrive à échéance ?"},
    "q_policy": {"en": "Did the site's configuration change?",
                 "fr": "La configuration du site a-t-elle changé ?"},
    "q_trust": {"en": "Whom does this site trust, and what changed?",
                "fr": "À qui le site fait-il confiance, qu'est-ce qui a changé ?"},
    "q_other": {"en": "Other acts recorded", "fr": "Autres actes enregistrés"},
    "none": {"en": "none", "fr": "aucun"},
    "none_recorded": {"en": "none recorded", "fr": "aucun enregistré"},
    "sent_line": {"en": "{model} → {to}, verdict {verdict}",
                  "fr": "{model} → {to}, verdict {verdict}"},
    "override_line": {"en": "exported under an OVERRIDE of a {verdict} verdict by {approver}: "
                            "“{justification}”",
                      "fr": "exporté par DÉROGATION à un verdict {verdict}, approuvée par "
                            "{approver} : « {justification} »"},
    "received_line": {"en": "{model} from {sender} (registered here as {local}), the "
                            "sender's verdict {verdict}",
                      "fr": "{model} de {sender} (enregistré ici comme {local}), verdict de "
                            "l'émetteur {verdict}"},
    "refused_line": {"en": "{n} refused: {reasons}", "fr": "{n} refusé(s) : {reasons}"},
    "budget_line": {"en": "dataset {dataset}: spent ε = {spent} of cap {cap}, remaining "
                          "{remaining}, at δ = {delta}, privacy unit {unit} ({runs} run(s))",
                    "fr": "jeu {dataset} : ε consommé = {spent} sur un plafond de {cap}, "
                          "reste {remaining}, à δ = {delta}, unité de confidentialité {unit} "
                          "({runs} exécution(s))"},
    "no_budget": {"en": "no fine-tuning run recorded: no differential-privacy budget spent",
                  "fr": "aucun ajustement enregistré : aucun budget de confidentialité "
                        "différentielle consommé"},
    "expires_in": {"en": "{what} expires {when} (in {days} days)",
                   "fr": "{what} expire le {when} (dans {days} jours)"},
    "expired_on": {"en": "{what} expired {when}", "fr": "{what} a expiré le {when}"},
    "count_of_kind": {"en": "{n} × {kind}", "fr": "{n} × {kind}"},
    "trust_line": {"en": "{trusted} site(s) trusted; {changes} change(s) recorded",
                   "fr": "{trusted} site(s) de confiance ; {changes} changement(s) "
                         "enregistré(s)"},
    # -- sections
    "identity": {"en": "Site identity", "fr": "Identité du site"},
    "site": {"en": "site", "fr": "site"},
    "fingerprint": {"en": "signing key fingerprint", "fr": "empreinte de la clé de signature"},
    "age_recipient": {"en": "age recipient", "fr": "destinataire age"},
    "record_count": {"en": "records in the ledger", "fr": "enregistrements du registre"},
    "trust": {"en": "Trust store", "fr": "Magasin de confiance"},
    "no_trust": {"en": "No site is trusted.", "fr": "Aucun site n'est de confiance."},
    "status": {"en": "status", "fr": "statut"},
    "added": {"en": "added", "fr": "ajouté"},
    "changed": {"en": "changed", "fr": "modifié"},
    "transfers_out": {"en": "Transfers out", "fr": "Transferts sortants"},
    "transfers_in": {"en": "Transfers in", "fr": "Transferts entrants"},
    "no_out": {"en": "No bundle was created at this site.",
               "fr": "Aucun paquet n'a été créé sur ce site."},
    "no_in": {"en": "No bundle was received at this site.",
              "fr": "Aucun paquet n'a été reçu sur ce site."},
    "refused": {"en": "Refused bundles", "fr": "Paquets refusés"},
    "record": {"en": "record", "fr": "enregistrement"},
    "time": {"en": "time", "fr": "heure"},
    "from": {"en": "from", "fr": "de"},
    "check": {"en": "check", "fr": "contrôle"},
    "reason": {"en": "reason", "fr": "motif"},
    "sequence": {"en": "transfer sequence", "fr": "numéro de transfert"},
    "purpose": {"en": "purpose", "fr": "finalité"},
    "legal_basis": {"en": "legal basis", "fr": "base légale"},
    "controller": {"en": "data controller", "fr": "responsable du traitement"},
    "verdict_shipped": {"en": "verdict shipped", "fr": "verdict transmis"},
    "payload_digest": {"en": "payload digest", "fr": "empreinte du contenu chiffré"},
    "onnx_digest": {"en": "ONNX digest", "fr": "empreinte ONNX"},
    "validity": {"en": "valid", "fr": "validité"},
    "validity_value": {"en": "from {created} until {expires}",
                       "fr": "du {created} au {expires}"},
    "receipt": {"en": "received by the recipient?", "fr": "reçu par le destinataire ?"},
    "receipt_yes": {"en": "received by {site} on {time} (its record #{seq})",
                    "fr": "reçu par {site} le {time} (son enregistrement n° {seq})"},
    "receipt_refused": {"en": "REFUSED by {site} on {time} ({check}, its record #{seq})",
                        "fr": "REFUSÉ par {site} le {time} ({check}, son enregistrement n° "
                              "{seq})"},
    "receipt_no": {"en": "NOT recorded by {site}: its verified ledger export names no "
                         "receipt or refusal of this bundle",
                   "fr": "NON enregistré par {site} : l'export vérifié de son registre ne "
                         "mentionne ni réception ni refus de ce paquet"},
    "receipt_unknown": {"en": "not known here: the recipient's ledger says (give its export "
                              "with <code>passerelle report --peer FILE</code>)",
                        "fr": "inconnu ici : le registre du destinataire le dit (fournir son "
                              "export avec <code>passerelle report --peer FICHIER</code>)"},
    "signature_chain": {"en": "signature and chain", "fr": "signature et chaînage"},
    "verified": {"en": "verified", "fr": "vérifiés"},
    "see_verdict": {"en": "see the integrity verdict above",
                    "fr": "voir le verdict d'intégrité ci-dessus"},
    "evidence": {"en": "evidence", "fr": "preuves"},
    "sender_record": {"en": "sender's bundle_created record",
                      "fr": "enregistrement bundle_created de l'émetteur"},
    "sender_key": {"en": "sender key", "fr": "clé de l'émetteur"},
    "registered_as": {"en": "registered here as", "fr": "enregistré ici comme"},
    "sender_verdict": {"en": "sender's audit verdict", "fr": "verdict d'audit de l'émetteur"},
    "bundle_signatures": {"en": "bundle signatures", "fr": "signatures du paquet"},
    "bundle_signatures_ok": {"en": "outer header and OpenSSF model signature verified with "
                                   "the sender's pinned key before installation",
                             "fr": "en-tête et signature OpenSSF du modèle vérifiés avec la "
                                   "clé épinglée de l'émetteur avant installation"},
    # -- audit
    "audit": {"en": "Memorisation audit", "fr": "Audit de mémorisation"},
    "audit_verdict": {"en": "audit verdict", "fr": "verdict de l'audit"},
    "failed_criteria": {"en": "failed criteria", "fr": "critères non satisfaits"},
    "policy": {"en": "policy", "fr": "politique"},
    "policy_pinned": {"en": "the site's pinned policy", "fr": "la politique épinglée du site"},
    "policy_not_pinned": {"en": "NOT the site's pinned policy ({pinned})",
                          "fr": "PAS la politique épinglée du site ({pinned})"},
    "policy_no_pin": {"en": "no policy pinned in the site's configuration",
                      "fr": "aucune politique épinglée dans la configuration du site"},
    "audited_onnx": {"en": "audited ONNX", "fr": "ONNX audité"},
    "audit_report": {"en": "audit report", "fr": "rapport d'audit"},
    "no_audit": {"en": "No audit verdict recorded at this site for this version.",
                 "fr": "Aucun verdict d'audit enregistré sur ce site pour cette version."},
    "report_matches": {"en": "the audit report in MLflow matches the digest in the signed "
                             "record",
                       "fr": "le rapport d'audit dans MLflow correspond à l'empreinte de "
                             "l'enregistrement signé"},
    "report_differs": {"en": "the audit report in MLflow does NOT match the signed record: "
                             "its figures are not shown",
                       "fr": "le rapport d'audit dans MLflow NE correspond PAS à "
                             "l'enregistrement signé : ses chiffres ne sont pas affichés"},
    "report_missing": {"en": "the audit report is no longer in MLflow",
                       "fr": "le rapport d'audit n'est plus dans MLflow"},
    "report_shipped": {"en": "the sender's audit report, shipped inside the signed bundle",
                       "fr": "le rapport d'audit de l'émetteur, transmis dans le paquet "
                             "signé"},
    "attack": {"en": "attack", "fr": "attaque"},
    "auc": {"en": "AUC", "fr": "AUC"},
    "tpr_01": {"en": "TPR at 0.1 % FPR", "fr": "TVP à 0,1 % de TFP"},
    "tpr_1": {"en": "TPR at 1 % FPR", "fr": "TVP à 1 % de TFP"},
    "eps_lower": {"en": "ε lower bound", "fr": "borne inférieure de ε"},
    "eps_max": {"en": "largest detectable ε", "fr": "plus grand ε détectable"},
    "members": {"en": "members", "fr": "membres"},
    "nonmembers": {"en": "non-members", "fr": "non-membres"},
    "limit": {"en": "policy limit", "fr": "limite de la politique"},
    "reference_models": {"en": "reference models", "fr": "modèles de référence"},
    "recipe": {"en": "recipe", "fr": "recette"},
    "recipe_value": {"en": "the model's own training recipe on random halves of the audit "
                           "pool, by {unit}",
                     "fr": "la recette d'entraînement du modèle sur des moitiés aléatoires "
                           "du jeu d'audit, par {unit}"},
    "recipe_named": {"en": "{kind}: {name} ({digest}), on random halves of the audit pool, "
                           "by {unit}",
                     "fr": "{kind} : {name} ({digest}), sur des moitiés aléatoires du jeu "
                           "d'audit, par {unit}"},
    "fit_shift": {"en": "reference models' fit", "fr": "ajustement des modèles de référence"},
    "fit_shift_value": {
        "en": "the target's members score {members} standard deviations from the "
              "reference models trained on them, its non-members {nonmembers} from "
              "those that were not (limit ±{limit}; about 0 when the recipe reproduces "
              "the target)",
        "fr": "les membres de la cible s'écartent de {members} écarts-types des "
              "modèles de référence entraînés sur eux, ses non-membres de {nonmembers} "
              "de ceux qui ne l'ont pas été (limite ±{limit} ; proche de 0 quand la "
              "recette reproduit la cible)"},
    "recipe_kind_builtin": {"en": "Passerelle's built-in coder",
                            "fr": "le codeur intégré de Passerelle"},
    "recipe_kind_entry-point": {"en": "the vendor's recipe (entry point)",
                                "fr": "la recette du fournisseur (point d'entrée)"},
    "recipe_kind_module": {"en": "the vendor's recipe (Python module)",
                           "fr": "la recette du fournisseur (module Python)"},
    "recipe_kind_onnx-reinit": {"en": "re-initialised copies of the shipped ONNX, retrained "
                                      "by Passerelle",
                                "fr": "copies réinitialisées de l'ONNX livré, réentraînées "
                                      "par Passerelle"},
    "recipe_kind_vendor-references": {"en": "reference models the vendor trained on halves "
                                            "Passerelle drew",
                                      "fr": "modèles de référence entraînés par le "
                                            "fournisseur sur des moitiés tirées par "
                                            "Passerelle"},
    "membership_question": {"en": "membership question", "fr": "question d'appartenance"},
    "canaries": {"en": "canary exposure", "fr": "exposition des canaris"},
    "no_canaries": {"en": "no canary in the training split ({held} held out)",
                    "fr": "aucun canari dans la partie d'entraînement ({held} mis de côté)"},
    "canary_row": {"en": "canary {i}: {bits} bits (of {max} possible)",
                   "fr": "canari {i} : {bits} bits (sur {max} possibles)"},
    "scan": {"en": "identifier scan", "fr": "recherche d'identifiants"},
    "scan_clean": {"en": "no finding in {files} file(s) scanned",
                   "fr": "aucune trouvaille dans {files} fichier(s) examiné(s)"},
    "finding": {"en": "finding", "fr": "trouvaille"},
    "where": {"en": "where", "fr": "où"},
    "redacted": {"en": "redacted", "fr": "masqué"},
    "criteria": {"en": "criteria", "fr": "critères"},
    "measured": {"en": "measured", "fr": "mesuré"},
    "passed": {"en": "passed", "fr": "satisfait"},
    "yes": {"en": "yes", "fr": "oui"},
    "no": {"en": "no", "fr": "non"},
    "epsilon_note": {"en": "The ε lower bound is a one-sided Clopper-Pearson bound; the "
                           "largest detectable ε is what these sample sizes could show at "
                           "most: a small audit cannot prove a large ε, nor safety. Figures "
                           "are rounded against the model (up; the largest detectable ε "
                           "down).",
                     "fr": "La borne inférieure de ε est une borne unilatérale de "
                           "Clopper-Pearson ; le plus grand ε détectable est le maximum que "
                           "ces tailles d'échantillon pouvaient montrer : un petit audit ne "
                           "prouve ni un grand ε, ni l'innocuité. Les chiffres sont arrondis "
                           "en défaveur du modèle (vers le haut ; le plus grand ε détectable "
                           "vers le bas)."},
    "roc_missing": {"en": "No ROC plot in this site's MLflow store for this version.",
                    "fr": "Pas de courbe ROC dans le registre MLflow du site pour cette "
                          "version."},
    "override_by": {"en": "export override by", "fr": "dérogation à l'export par"},
    "justification": {"en": "justification", "fr": "justification"},
    "verdict_overridden": {"en": "verdict overridden", "fr": "verdict outrepassé"},
    # -- DP
    "dp_budget": {"en": "Differential-privacy budget", "fr": "Budget de confidentialité "
                                                            "différentielle"},
    "dp_runs": {"en": "Fine-tuning runs under DP-SGD", "fr": "Ajustements sous DP-SGD"},
    "model": {"en": "model", "fr": "modèle"},
    "dataset": {"en": "dataset", "fr": "jeu de données"},
    "eps_pld": {"en": "ε (PLD, claimed)", "fr": "ε (PLD, annoncé)"},
    "eps_rdp": {"en": "ε (RDP)", "fr": "ε (RDP)"},
    "delta": {"en": "δ", "fr": "δ"},
    "unit": {"en": "privacy unit", "fr": "unité de confidentialité"},
    "noise": {"en": "noise multiplier", "fr": "multiplicateur de bruit"},
    "q": {"en": "sampling rate q", "fr": "taux d'échantillonnage q"},
    "steps": {"en": "steps", "fr": "pas"},
    "accuracy": {"en": "accuracy before → after", "fr": "exactitude avant → après"},
    "outcome": {"en": "outcome", "fr": "issue"},
    "run_done": {"en": "completed", "fr": "terminé"},
    "run_failed": {"en": "FAILED", "fr": "ÉCHEC"},
    "run_interrupted": {"en": "INTERRUPTED (started, never ended)",
                        "fr": "INTERROMPU (commencé, jamais terminé)"},
    "dp_rounding": {"en": "ε and δ are rounded up, the remaining budget down.",
                    "fr": "ε et δ sont arrondis vers le haut, le budget restant vers le bas."},
    "budget_per_dataset": {"en": "Budget per dataset", "fr": "Budget par jeu de données"},
    "spent": {"en": "spent ε", "fr": "ε consommé"},
    "cap": {"en": "cap", "fr": "plafond"},
    "remaining": {"en": "remaining", "fr": "reste"},
    "runs": {"en": "runs", "fr": "exécutions"},
    # -- records
    "records": {"en": "Every record", "fr": "Tous les enregistrements"},
    "filter": {"en": "Filter records", "fr": "Filtrer les enregistrements"},
    "filter_placeholder": {"en": "text in a record (model, digest, approver…)",
                           "fr": "texte d'un enregistrement (modèle, empreinte, "
                                 "approbateur…)"},
    "all_kinds": {"en": "all kinds", "fr": "toutes les natures"},
    "kind": {"en": "kind", "fr": "nature"},
    "shown": {"en": "records shown", "fr": "enregistrements affichés"},
    "statement": {"en": "signed statement (in-toto, in its DSSE envelope)",
                  "fr": "déclaration signée (in-toto, dans son enveloppe DSSE)"},
    "subjects": {"en": "subjects", "fr": "objets"},
    "prev": {"en": "previous record", "fr": "enregistrement précédent"},
    "keyid": {"en": "signed by key", "fr": "signé par la clé"},
    "links": {"en": "evidence", "fr": "preuves"},
    # -- signature
    "report_signature": {"en": "This report's digest and signature",
                         "fr": "Empreinte et signature de ce rapport"},
    "report_signature_text": {
        "en": "SHA-256 of this file without this section: <code>{digest}</code>, signed "
              "(DSSE, in-toto statement) by the key of site {site} <code>{keyid}</code>. "
              "Check it with <code>passerelle records verify-report FILE</code>, or with "
              "any DSSE verifier (the envelope is in this section).",
        "fr": "SHA-256 de ce fichier sans cette section : <code>{digest}</code>, signée "
              "(DSSE, déclaration in-toto) par la clé du site {site} <code>{keyid}</code>. "
              "À vérifier avec <code>passerelle records verify-report FICHIER</code>, ou "
              "avec tout vérificateur DSSE (l'enveloppe est dans cette section)."},
    # -- dossier
    "dossier_title": {"en": "Model status dossier: {model}",
                      "fr": "Dossier de statut du modèle : {model}"},
    "dossier_intro": {
        "en": "What the provider documents under the CNIL's method for the status of an AI "
              "model under the GDPR (“IA : Analyser le statut d'un modèle d'IA au regard du "
              "RGPD”, 22 July 2025) and the EDPB opinion 28/2024 on AI models: "
              "the training data and its legal basis, the attacks tried and their results, "
              "the identifier scan, the measures taken, and the conclusion with its limits. "
              "Every figure comes from this site's signed ledger and MLflow store.",
        "fr": "Ce que le fournisseur documente selon la méthode de la CNIL pour analyser le "
              "statut d'un modèle d'IA au regard du RGPD (« IA : Analyser le statut d'un "
              "modèle d'IA au regard du RGPD », 22 juillet 2025) et l'avis 28/2024 du "
              "CEPD sur les modèles d'IA : les données d'entraînement et leur base légale, "
              "les attaques tentées et leurs résultats, la recherche d'identifiants, les "
              "mesures prises, et la conclusion avec ses limites. Chaque chiffre provient du "
              "registre signé et du registre MLflow de ce site."},
    "d_model": {"en": "1. The model", "fr": "1. Le modèle"},
    "d_training": {"en": "2. Training data and legal basis",
                   "fr": "2. Données d'entraînement et base légale"},
    "d_attacks": {"en": "3. Attacks run and their results against the policy",
                  "fr": "3. Attaques menées et résultats au regard de la politique"},
    "d_scan": {"en": "4. Identifier scan of everything shipped",
               "fr": "4. Recherche d'identifiants dans tout ce qui est transmis"},
    "d_measures": {"en": "5. Measures taken", "fr": "5. Mesures prises"},
    "d_conclusion": {"en": "6. Conclusion and its limits", "fr": "6. Conclusion et limites"},
    "d_records": {"en": "7. Signed records about this version",
                  "fr": "7. Enregistrements signés concernant cette version"},
    "training_site": {"en": "training site", "fr": "site d'entraînement"},
    "dataset_fingerprint": {"en": "dataset fingerprint (digest of the corpus manifest, not "
                                  "the data)",
                            "fr": "empreinte du jeu (condensat du manifeste, pas les "
                                  "données)"},
    "finetune_dataset": {"en": "fine-tuning data at this site (dataset fingerprint)",
                         "fr": "données d'ajustement sur ce site (empreinte du jeu)"},
    "train_size": {"en": "training stays / patients", "fr": "séjours / patients "
                                                           "d'entraînement"},
    "architecture": {"en": "architecture", "fr": "architecture"},
    "framework": {"en": "source framework", "fr": "cadriciel d'origine"},
    "lineage": {"en": "lineage", "fr": "filiation"},
    "received_from": {"en": "received from {site}, version {version} there",
                      "fr": "reçu de {site}, version {version} là-bas"},
    "finetuned_from": {"en": "fine-tuned here from {source}", "fr": "ajusté ici à partir de "
                                                                   "{source}"},
    "m_vocab": {"en": "vocabulary floor: a token enters the vocabulary only if at least {n} "
                      "distinct patients use it; identifier-like tokens are dropped "
                      "({filter})",
                "fr": "seuil du vocabulaire : un mot n'y entre que s'il est employé par au "
                      "moins {n} patients distincts ; les mots ressemblant à des "
                      "identifiants sont écartés ({filter})"},
    "m_vocab_unknown": {"en": "vocabulary settings: not recorded on this version",
                        "fr": "réglages du vocabulaire : non enregistrés sur cette version"},
    "m_gate": {"en": "export gate: the ONNX bytes leave only with a PASS verdict on exactly "
                     "those bytes, or a named approver's recorded override",
               "fr": "contrôle à l'export : les octets ONNX ne sortent qu'avec un verdict "
                     "PASS sur ces octets précisément, ou une dérogation nominative "
                     "enregistrée"},
    "m_onnx": {"en": "only ONNX, vocabulary, labels and a model card cross the boundary, "
                     "signed (OpenSSF model signing) and encrypted (age) to named sites",
               "fr": "seuls l'ONNX, le vocabulaire, les libellés et une fiche du modèle "
                     "franchissent la frontière, signés (OpenSSF model signing) et chiffrés "
                     "(age) pour des sites nommés"},
    "m_dp": {"en": "DP-SGD fine-tuning at this site: ε = {eps} (PLD; RDP {rdp}) at δ = "
                   "{delta}, per {unit}",
             "fr": "ajustement DP-SGD sur ce site : ε = {eps} (PLD ; RDP {rdp}) à δ = "
                   "{delta}, par {unit}"},
    "m_no_dp": {"en": "no DP fine-tuning of this version recorded here",
                "fr": "aucun ajustement DP de cette version enregistré ici"},
    "c_pass": {"en": "Under policy {policy}, none of the {attacks} membership-inference "
                     "attacks, the canary test or the identifier scan exceeded its limit: the "
                     "audit found no evidence that personal data of the training patients "
                     "can be extracted or inferred from the model.",
               "fr": "Sous la politique {policy}, aucune des {attacks} attaques par "
                     "inférence d'appartenance, ni le test des canaris, ni la recherche "
                     "d'identifiants n'a dépassé sa limite : l'audit n'a trouvé aucun indice "
                     "que des données personnelles des patients d'entraînement puissent être "
                     "extraites ou déduites du modèle."},
    "c_fail": {"en": "The audit FAILED under policy {policy} ({failed}). The model cannot be "
                     "regarded as anonymous: it is to be treated as containing personal "
                     "data, with a legal basis and the safeguards of the GDPR wherever it "
                     "goes.",
               "fr": "L'audit a ÉCHOUÉ sous la politique {policy} ({failed}). Le modèle ne "
                     "peut pas être regardé comme anonyme : il doit être traité comme "
                     "contenant des données personnelles, avec une base légale et les "
                     "garanties du RGPD partout où il va."},
    "c_none": {"en": "No audit of this version is recorded at this site: its status cannot "
                     "be concluded from this dossier.",
               "fr": "Aucun audit de cette version n'est enregistré sur ce site : son statut "
                     "ne peut pas être établi par ce dossier."},
    "c_override": {"en": "It was nevertheless exported on the recorded responsibility of "
                         "{approver}: “{justification}”.",
                   "fr": "Il a néanmoins été exporté sous la responsabilité enregistrée de "
                         "{approver} : « {justification} »."},
    "c_limits": {"en": "Limits: an audit is evidence, not proof. With {members} members and "
                       "{nonmembers} non-members, no ε above {eps_max} could have been "
                       "detected; the attacks are those listed above (stronger ones may "
                       "exist); the data are those of the audit pool; the EDPB asks that the "
                       "likelihood of extraction and of obtaining personal data through "
                       "queries be insignificant, which is assessed case by case by the "
                       "controller and the supervisory authority.",
                 "fr": "Limites : un audit est un indice, pas une preuve. Avec {members} "
                       "membres et {nonmembers} non-membres, aucun ε supérieur à {eps_max} "
                       "n'aurait pu être détecté ; les attaques sont celles listées ci-dessus "
                       "(de plus fortes peuvent exister) ; les données sont celles du jeu "
                       "d'audit ; le CEPD demande que la probabilité d'extraction et "
                       "d'obtention de données personnelles par des requêtes soit "
                       "négligeable, ce qu'apprécient au cas par cas le responsable du "
                       "traitement et l'autorité de contrôle."},
    "c_dp": {"en": "At this site the model was further trained under differential privacy "
                   "(ε = {eps}, δ = {delta}, per {unit}): whatever this site's patients "
                   "contributed is bounded by that guarantee.",
             "fr": "Sur ce site, le modèle a été ajusté sous confidentialité différentielle "
                   "(ε = {eps}, δ = {delta}, par {unit}) : ce qu'ont apporté les patients de "
                   "ce site est borné par cette garantie."},
    "unknown_version": {"en": "no version {ref} in this site's ledger",
                        "fr": "aucune version {ref} dans le registre de ce site"},
}


def text(lang: Lang, key: str, **values: Any) -> str:
    """The phrase ``key`` in ``lang``, with ``values`` filled in."""
    phrase = STRINGS[key][lang]
    return phrase.format(**values) if values else phrase


_NUMBERS: ContextVar[Lang] = ContextVar("passerelle_number_language", default="en")


@contextmanager
def numbers_in(lang: Lang) -> Iterator[None]:
    """Within: :func:`up`, :func:`down` and :func:`up_significant` write numbers the way
    ``lang`` does (French: a decimal comma, ``4,334``)."""
    token = _NUMBERS.set(lang)
    try:
        yield
    finally:
        _NUMBERS.reset(token)


def _rounded(value: Any, digits: int, rounding: str, significant: bool = False) -> str:
    written = _rounded_en(value, digits, rounding, significant)
    return written.replace(".", ",") if _NUMBERS.get() == "fr" else written


def _rounded_en(value: Any, digits: int, rounding: str, significant: bool = False) -> str:
    try:
        number = Decimal(repr(float(value)))  # the decimal the float stands for
    except (TypeError, ValueError, InvalidOperation):
        return "?" if value is None else str(value)
    if not number.is_finite():
        return str(float(value))
    if number != 0 and (significant or abs(number) < Decimal(10) ** -digits):
        exponent = number.adjusted() - (digits - 1 if significant else 2)
        return format(number.quantize(Decimal(10) ** exponent, rounding=rounding).normalize(),
                      "g")
    text_ = str(number.quantize(Decimal(10) ** -digits, rounding=rounding))
    return text_.rstrip("0").rstrip(".") if "." in text_ else text_


def up(value: Any, digits: int = 3) -> str:
    """``value`` rounded towards +infinity (never shown smaller than it is)."""
    return _rounded(value, digits, ROUND_CEILING)


def up_significant(value: Any, digits: int = 3) -> str:
    """``value`` rounded towards +infinity to ``digits`` significant digits (for delta)."""
    return _rounded(value, digits, ROUND_CEILING, significant=True)


def down(value: Any, digits: int = 3) -> str:
    """``value`` rounded towards -infinity (never shown larger than it is)."""
    return _rounded(value, digits, ROUND_FLOOR)


def parse_utc(stamp: str) -> datetime | None:
    try:
        value = datetime.fromisoformat(stamp)
    except (TypeError, ValueError):
        return None
    return value if value.tzinfo else value.replace(tzinfo=UTC)


def when(stamp: str) -> str:
    """``2026-12-01 09:17:41 UTC (10:17:41 Paris)``; the text as given if it is no time."""
    value = parse_utc(stamp)
    if value is None:
        return stamp
    utc = value.astimezone(UTC)
    local = value.astimezone(LOCAL_ZONE)
    day = "" if local.date() == utc.date() else local.strftime("%Y-%m-%d ")
    return f"{utc:%Y-%m-%d %H:%M:%S} UTC ({day}{local:%H:%M:%S} Paris)"
