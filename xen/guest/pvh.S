# Ferry's Xen test guest: a PVH kernel (no OS) that checks itself.
#
# Xen enters it at `pvh_start` in 32-bit protected mode without paging (the
# XEN_ELFNOTE_PHYS32_ENTRY note below); it builds an identity map of the first GiB,
# switches to long mode and runs the workload in ring 0:
#   every pass adds 1 to the first quadword of each of WORK_PAGES pages from WORK_START,
#   keeps the pass count in rbx and a copy in xmm0, then checks that every page holds
#   exactly the pass count and that xmm0 agrees. A page lost or left stale by a migration,
#   or SSE state lost, is found at the next pass end.
# Progress goes to Xen's debug port 0xE9 (shown as "(dN) ferry-pvh ..." on the Xen console
# with guest_loglvl=all): "ferry-pvh pass N" after every pass, "ferry-pvh FAIL ..." and a
# halt on a failed check.

    .set WORK_START, 0x1000000          # 16 MiB
    .set WORK_PAGES, 8192               # 32 MiB
    .set REPORT_EVERY, 1
    # Spin iterations after each page write: paces the guest to a dirty rate a nested,
    # emulated link can follow (a few thousand pages per second under TCG).
    .set DELAY, 8000

    .section .note.Xen, "a"
    .balign 4
    .long 4                             # name size
    .long 4                             # descriptor size
    .long 18                            # XEN_ELFNOTE_PHYS32_ENTRY
    .asciz "Xen"
    .balign 4
    .long pvh_start

    .text
    .code32
    .globl pvh_start
pvh_start:
    cli
    mov $stack_top, %esp
    # PD: 512 x 2 MiB pages (present, writable, large).
    mov $pd, %edi
    xor %eax, %eax
1:  mov %eax, %edx
    shl $21, %edx
    or $0x83, %edx
    mov %edx, (%edi,%eax,8)
    movl $0, 4(%edi,%eax,8)
    inc %eax
    cmp $512, %eax
    jb 1b
    mov $pd, %eax
    or $3, %eax
    mov %eax, pdpt
    mov $pdpt, %eax
    or $3, %eax
    mov %eax, pml4
    mov $pml4, %eax
    mov %eax, %cr3
    mov %cr4, %eax
    or $0x620, %eax                     # PAE | OSFXSR | OSXMMEXCPT
    mov %eax, %cr4
    mov $0xC0000080, %ecx               # EFER.LME
    rdmsr
    or $0x100, %eax
    wrmsr
    mov %cr0, %eax
    and $~0x4, %eax                     # no EM: SSE allowed
    or $0x80000002, %eax                # PG | MP
    mov %eax, %cr0
    lgdt gdt_desc
    ljmp $0x08, $long_start

    .code64
long_start:
    mov $0x10, %ax
    mov %ax, %ds
    mov %ax, %es
    mov %ax, %ss
    mov $stack_top, %rsp
    lea msg_start(%rip), %rsi
    call puts
    xor %rbx, %rbx
    pxor %xmm0, %xmm0
pass:
    mov $WORK_START, %rdi
    mov $WORK_PAGES, %rcx
2:  incq (%rdi)
    mov $DELAY, %edx
7:  dec %edx
    jnz 7b
    add $4096, %rdi
    dec %rcx
    jnz 2b
    inc %rbx
    movq %xmm0, %rax
    inc %rax
    movq %rax, %xmm0
    cmp %rax, %rbx
    jne fail_sse
    mov $WORK_START, %rdi
    mov $WORK_PAGES, %rcx
3:  cmp %rbx, (%rdi)
    jne fail_page
    add $4096, %rdi
    dec %rcx
    jnz 3b
    test $(REPORT_EVERY - 1), %rbx
    jnz pass
    lea msg_pass(%rip), %rsi
    call puts
    mov %rbx, %rax
    call putnum
    call newline
    jmp pass

fail_sse:
    lea msg_sse(%rip), %rsi
    call puts
    mov %rbx, %rax
    call putnum
    call newline
    jmp halt
fail_page:
    lea msg_page(%rip), %rsi
    call puts
    mov %rdi, %rax
    call putnum
    lea msg_holds(%rip), %rsi
    call puts
    mov (%rdi), %rax
    call putnum
    lea msg_at(%rip), %rsi
    call puts
    mov %rbx, %rax
    call putnum
    call newline
halt:
    hlt
    jmp halt

# puts: the NUL-terminated string at rsi to port 0xE9.
puts:
    mov $0xE9, %dx
4:  lodsb
    test %al, %al
    jz 5f
    outb %al, %dx
    jmp 4b
5:  ret
newline:
    mov $0xE9, %dx
    mov $10, %al
    outb %al, %dx
    ret
# putnum: rax in decimal.
putnum:
    lea numbuf_end(%rip), %rsi
    movb $0, (%rsi)
    mov $10, %rcx
6:  xor %rdx, %rdx
    div %rcx
    add $'0', %dl
    dec %rsi
    mov %dl, (%rsi)
    test %rax, %rax
    jnz 6b
    jmp puts

    .section .rodata
msg_start: .asciz "ferry-pvh started\n"
msg_pass:  .asciz "ferry-pvh pass "
msg_sse:   .asciz "ferry-pvh FAIL: xmm0 lost the pass count at pass "
msg_page:  .asciz "ferry-pvh FAIL: page at "
msg_holds: .asciz " holds "
msg_at:    .asciz " at pass "
    .balign 8
gdt:
    .quad 0
    .quad 0x00af9a000000ffff            # 0x08: 64-bit code
    .quad 0x00cf92000000ffff            # 0x10: data
gdt_desc:
    .word gdt_desc - gdt - 1
    .long gdt

    .data
    .balign 4096
pml4: .fill 4096, 1, 0
pdpt: .fill 4096, 1, 0
pd:   .fill 4096, 1, 0
stack: .fill 8192, 1, 0
stack_top:
numbuf: .fill 31, 1, 0
numbuf_end: .byte 0
