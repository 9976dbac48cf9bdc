// CRC-32 (zlib's) by folding with carry-less multiplication. Why: zlib 1.2's CRC (Python's zlib.crc32) runs at about
// 2 GB/s a core on the Xeon of the CI machines, so checking a native RN50 checkpoint's 456 MB took 0.12 s of its
// 0.28 s warm load on 2 threads (a probe); this runs 3-5x faster there (benchmarks/results/crc_cpu_2threads.md).
//
// The arithmetic, over GF(2), in zlib's bit order: byte 0 bit 0 of a message is the coefficient of its highest power
// of x, so 16 bytes loaded little-endian into a 128-bit register hold bit i as the coefficient of x^(127 - i), and
// the register's low 64 bits (qword 0) are its high-degree half. The CRC register of a message M (started at 0,
// not inverted) is M(x) x^32 mod P(x), bit-reflected; any M' congruent to M mod P, aligned at M's end, has the same
// one. Folding keeps such an M' in 128-bit registers: a block X = Xh x^64 + Xl followed by D more bits of message
// contributes X x^D = Xh x^(D+64) + Xl x^D, congruent to Xh (x^(D+64) mod P) + Xl (x^D mod P), two products of a
// 64-bit half by a 32-bit constant that fit in 96 bits. PCLMULQDQ of a 64-bit half by a constant held reflected in
// 33 bits (bit 32 - d for the coefficient of x^d) gives a 96-bit reflected product, bit k the coefficient of
// x^(95 - k); read as a 128-bit register it stands for the product times x^32. So the constants are x^(D+32) mod P
// for Xh and x^(D-32) mod P for Xl. Four registers fold 64 bytes at a time (D = 512), then fold into one another
// and take one 16-byte block at a time (D = 128); the last register, as 16 bytes, and the bytes past the last whole
// block go through the table, starting from 0. The starting value enters as the inverted register XORed into the
// first 4 bytes (a CRC started at R over M is the CRC started at 0 over M with R added to its first 32 bits). The
// constants were checked against zlib by a model of this in Python; tests/test_crc.py compares the result
// with zlib.crc32 at every length up to 300 bytes, at every alignment, and from other starting values.
#include "crc32.h"

#include <array>

// GCC and clang (not clang-cl, whose __builtin_cpu_supports needs a runtime it may not link; MSVC takes the table)
#if (defined(__x86_64__) || defined(__i386__)) && (defined(__GNUC__) || defined(__clang__)) && !defined(_MSC_VER)
#define DCF_CRC32_CLMUL 1
#include <immintrin.h>
#endif

namespace denseclip_fast {
namespace {

constexpr uint32_t kReflectedPolynomial = 0xEDB88320u;

constexpr std::array<uint32_t, 256> make_table() {
  std::array<uint32_t, 256> table{};
  for (uint32_t i = 0; i < 256; ++i) {
    uint32_t c = i;
    for (int bit = 0; bit < 8; ++bit) c = (c >> 1) ^ ((c & 1u) ? kReflectedPolynomial : 0u);
    table[i] = c;
  }
  return table;
}

constexpr std::array<uint32_t, 256> kTable = make_table();

// The CRC register (not inverted) advanced over ``size`` bytes, one at a time.
uint32_t bytewise(uint32_t reg, const unsigned char* data, size_t size) {
  for (size_t i = 0; i < size; ++i) reg = kTable[(reg ^ data[i]) & 0xFFu] ^ (reg >> 8);
  return reg;
}

#ifdef DCF_CRC32_CLMUL
// (x^(D+32) mod P, x^(D-32) mod P), reflected in 33 bits, for D = 512 and D = 128
constexpr uint64_t kFold512Low = 0x154442bd4ull, kFold512High = 0x1c6e41596ull;
constexpr uint64_t kFold128Low = 0x1751997d0ull, kFold128High = 0x0ccaa009eull;
constexpr uintptr_t kPrefetchAhead = 2048;  // bytes

__attribute__((target("pclmul,sse2"))) inline __m128i fold(__m128i x, __m128i k) {
  return _mm_xor_si128(_mm_clmulepi64_si128(x, k, 0x00), _mm_clmulepi64_si128(x, k, 0x11));
}

__attribute__((target("pclmul,sse2"))) inline __m128i load(const unsigned char* p) {
  return _mm_loadu_si128(reinterpret_cast<const __m128i*>(p));
}

// The CRC register (not inverted) advanced over ``size`` >= 64 bytes.
__attribute__((target("pclmul,sse2"))) uint32_t clmul_register(uint32_t reg, const unsigned char* data, size_t size) {
  const __m128i k512 = _mm_set_epi64x(static_cast<long long>(kFold512High), static_cast<long long>(kFold512Low));
  const __m128i k128 = _mm_set_epi64x(static_cast<long long>(kFold128High), static_cast<long long>(kFold128Low));
  __m128i x0 = _mm_xor_si128(load(data), _mm_cvtsi32_si128(static_cast<int>(reg)));
  __m128i x1 = load(data + 16), x2 = load(data + 32), x3 = load(data + 48);
  const unsigned char* p = data + 64;
  const unsigned char* end = data + size;
  for (; end - p >= 64; p += 64) {
    // a hint, which never faults past the end: 10.8 GB/s instead of 8.2 on one core of the CI's Xeon (a probe on
    // 400 MiB; its single-thread read bandwidth, torch.sum's, was 11)
    _mm_prefetch(reinterpret_cast<const char*>(reinterpret_cast<uintptr_t>(p) + kPrefetchAhead), _MM_HINT_T0);
    x0 = _mm_xor_si128(fold(x0, k512), load(p));
    x1 = _mm_xor_si128(fold(x1, k512), load(p + 16));
    x2 = _mm_xor_si128(fold(x2, k512), load(p + 32));
    x3 = _mm_xor_si128(fold(x3, k512), load(p + 48));
  }
  __m128i v = _mm_xor_si128(fold(x0, k128), x1);
  v = _mm_xor_si128(fold(v, k128), x2);
  v = _mm_xor_si128(fold(v, k128), x3);
  for (; end - p >= 16; p += 16) v = _mm_xor_si128(fold(v, k128), load(p));
  alignas(16) unsigned char residue[16];
  _mm_store_si128(reinterpret_cast<__m128i*>(residue), v);
  return bytewise(bytewise(0u, residue, sizeof residue), p, static_cast<size_t>(end - p));
}

bool detect_clmul() {
  __builtin_cpu_init();
  return __builtin_cpu_supports("pclmul") && __builtin_cpu_supports("sse2");
}
#endif

}  // namespace

bool crc32_uses_clmul() {
#ifdef DCF_CRC32_CLMUL
  static const bool available = detect_clmul();
  return available;
#else
  return false;
#endif
}

uint32_t crc32(uint32_t value, const unsigned char* data, size_t size) {
  uint32_t reg = ~value;
#ifdef DCF_CRC32_CLMUL
  if (size >= 64 && crc32_uses_clmul()) return ~clmul_register(reg, data, size);
#endif
  return ~bytewise(reg, data, size);
}

}  // namespace denseclip_fast
