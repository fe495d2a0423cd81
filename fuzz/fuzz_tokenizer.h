// What both tokenizer harnesses do with a tokenizer that loaded: encode and decode fixed texts,
// check every id is in the vocabulary, that ids outside it do not decode, and that vocab_info
// agrees with vocab_size.
#pragma once
#include <vector>

#include "fuzz_common.h"
#include "tensor/tensor.h"
#include "tokenizer/tokenizer.h"

namespace dqfuzz {

template <class Texts>  // any range of const char*
void exercise_tokenizer(const dq::Tokenizer& tok, const Texts& texts) {
  const size_t n = tok.vocab_size();
  for (const char* text : texts) {
    for (bool special : {false, true}) {
      std::vector<int32_t> ids = tok.encode(text, special);
      for (int32_t id : ids)
        if (id < 0 || size_t(id) >= n) finding("encode produced an id outside the vocabulary");
      (void)tok.decode(ids);
    }
  }
  std::vector<int32_t> all;
  for (size_t i = 0; i < n && i < 1024; ++i) all.push_back(int32_t(i));
  try {
    (void)tok.decode(all);
  } catch (const dq::Error&) {  // an id the vocabulary leaves unassigned (a gap) has no text
  }
  dq::VocabInfo v = tok.vocab_info();
  if (v.tokens.size() != n) finding("vocab_info size differs from vocab_size");
  // Ids outside the vocabulary: decoding them is an Error, never text.
  for (int32_t bad : {int32_t(-1), int32_t(n)}) {
    bool refused = false;
    try {
      (void)tok.decode({bad});
    } catch (const dq::Error&) {
      refused = true;
    }
    if (!refused) finding("decode accepted an id outside the vocabulary");
  }
}

}  // namespace dqfuzz
