from mmfast.cli import main

main()
