"""process_docs for edgeprune_hellaswag.yaml: lm-eval's hellaswag query and endings (utils.process_docs)."""

from edgeprune.eval.zeroshot import hellaswag_preprocess, hellaswag_query


def process_hellaswag(dataset):
    def _process_doc(doc):
        return {"query": hellaswag_query(doc), "choices": [hellaswag_preprocess(e) for e in doc["endings"]],
                "gold": int(doc["label"])}

    return dataset.map(_process_doc)
