# Ferry's KVM guest workload, ring 3, 64-bit.
# rdi = first page of the workload area, rsi = number of pages.
# Each pass adds 1 to the first quadword of every page in order, then reports the pass
# number on port 0x10 (the VMM counts passes) and keeps a copy of it in xmm0.
    .code64
    .globl _start
_start:
    xor %rbx, %rbx            # pass counter
1:
    mov %rdi, %rcx
    mov %rsi, %rdx
2:
    incq (%rcx)
    add $4096, %rcx
    dec %rdx
    jnz 2b
    inc %rbx
    movq %rbx, %xmm0
    mov %ebx, %eax
    mov $0x10, %dx
    out %eax, %dx
    jmp 1b
