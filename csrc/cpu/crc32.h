// CRC-32 as zlib computes it (polynomial 0x04C11DB7, reflected, the register started and ended inverted), for the
// checksums of the project's .safetensors files (denseclip_fast/checkpoints/crc.py). No Python headers: the plain
// C++ library (CMakeLists.txt) compiles it too.
#pragma once

#include <cstddef>
#include <cstdint>

namespace denseclip_fast {

// zlib's crc32(value, data, size): the CRC-32 of ``size`` bytes at ``data`` continued from ``value``, the CRC-32 of
// the bytes before them (0 for none). With carry-less multiplication (PCLMULQDQ) where this x86 processor has it,
// otherwise a byte at a time through a table.
uint32_t crc32(uint32_t value, const unsigned char* data, size_t size);

// Whether crc32 takes the carry-less multiplication path on this processor.
bool crc32_uses_clmul();

}  // namespace denseclip_fast
